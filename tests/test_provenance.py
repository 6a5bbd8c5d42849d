"""provenance.commit: this checkout's short commit (+dirty), or $VR1FAST_COMMIT outside a git checkout."""
import subprocess

from vr1fast import provenance


def test_commit_of_this_checkout():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert provenance.commit().removesuffix("+dirty") == head


def test_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("VR1FAST_COMMIT", raising=False)
    assert provenance.commit(tmp_path) == "unknown"
    monkeypatch.setenv("VR1FAST_COMMIT", "abc1234")
    assert provenance.commit(tmp_path) == "abc1234"
