"""Long command-line runs show progress without a terminal too: a line every few seconds (predict, replay)."""

from __future__ import annotations

from ecmnet_core.progress import Progress


def test_without_a_terminal_progress_prints_periodic_lines(capsys):
    progress = Progress("replay", "frame", total=5, every_s=0.0)  # capsys' stderr is not a TTY
    for _ in range(5):
        progress.update()
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "replay: 5 of 5 frame(s) so far" and len(lines) == 5


def test_lines_are_spaced_and_can_be_switched_off(capsys):
    spaced = Progress("predict", "image", every_s=3600.0)
    for _ in range(100):
        spaced.update()
    Progress("predict", "image", enabled=False, every_s=0.0).update(3)
    assert capsys.readouterr().err == ""  # none within the hour, none when disabled
    assert spaced.done == 100
