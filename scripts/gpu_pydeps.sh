# Sourced by the lent-GPU scripts (train_gpu.sh, gpu_check.sh): copy_pydeps DIR puts PyYAML's pure-Python part in
# DIR (the GPU machine has no PyYAML; its C speed-up is optional and fails to import there).
copy_pydeps() {
  local dir="$1"
  rm -rf "$dir"
  mkdir -p "$dir"
  local yaml_dir
  yaml_dir="$(python -c 'import os, yaml; print(os.path.dirname(yaml.__file__))')"
  cp -r "$yaml_dir" "$dir/yaml"
  find "$dir" -name '*.so' -delete
  find "$dir" -name '__pycache__' -prune -exec rm -rf {} +
}
