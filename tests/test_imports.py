"""vr1fast imports without the packages the stock GPU image lacks (``av``, ``rouge_score``, ``nltk``, and the optional
``deepspeed``, ``tensorboard``, ``decord``, ``wandb``, ``liger_kernel``, ``flash_attn``); using a feature that needs
av or rouge_score fails with one line naming the package. Each check runs in a fresh interpreter where those
packages are blocked (``sys.modules[name] = None``: ``import`` raises, ``importlib.util.find_spec`` says absent)."""
import subprocess
import sys
import textwrap

BLOCKED = ("av", "rouge_score", "nltk", "deepspeed", "tensorboard", "decord", "wandb", "liger_kernel", "flash_attn")
BLOCK = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
"""
MODULES = ("vr1fast.train", "vr1fast.rl.rewards", "vr1fast.rl.advantages", "vr1fast.rl.loss", "vr1fast.data.video",
           "vr1fast.data.decode", "vr1fast.data.dali", "vr1fast.data.synthetic", "vr1fast.data.processor",
           "vr1fast.data.shuffle",
           "vr1fast.model.forward", "vr1fast.model.load", "vr1fast.model.rope", "vr1fast.model.tokenizer",
           "vr1fast.model.shared", "vr1fast.model.vision", "vr1fast.model.lora", "vr1fast.eval.scoring",
           "vr1fast.kernels", "vr1fast.kernels.logprob", "vr1fast.kernels.grpo", "vr1fast.kernels.linear_logprob",
           "vr1fast.rollout", "vr1fast.dist", "vr1fast.metrics", "vr1fast.warmstart", "vr1fast.loop", "vr1fast.sft")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_modules_import_without_the_missing_packages():
    proc = _run(f"""
        import importlib
        for name in {MODULES!r}:
            importlib.import_module(name)
        assert all(sys.modules[n] is None for n in {BLOCKED!r}), "a blocked package got imported"
        print("imported", len({MODULES!r}))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"imported {len(MODULES)}" in proc.stdout


def test_rewards_without_rouge_score():
    """Rules that need no package still score; the free-form one raises naming the package (not a scored 0.0)."""
    proc = _run("""
        from vr1fast.rl.rewards import MissingPackageError, accuracy_reward
        assert accuracy_reward("<answer>B</answer>", "<answer>B</answer>", "multiple choice") == 1.0
        assert accuracy_reward("<answer>3.5</answer>", "<answer>3.50</answer>", "numerical") == 1.0
        try:
            accuracy_reward("<answer>a red cube</answer>", "<answer>a red cube</answer>", "free-form")
        except MissingPackageError as e:
            print("error:", e)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip()
    assert line.startswith("error:") and "'rouge_score' package" in line and "\n" not in line, line


def test_video_files_without_av(tmp_path):
    """Decoding and encoding name the missing 'av' package in one line (not a MediaError about the file)."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\\x00" * 64)
    proc = _run(f"""
        import numpy as np
        from vr1fast.data.decode import decode_frames
        from vr1fast.data.synthetic import encode_h264
        for call in (lambda: decode_frames({str(video)!r}, lambda total, fps: [0], backend="pyav"),
                     lambda: encode_h264(np.zeros((2, 16, 16, 3), np.uint8), {str(tmp_path / 'out.mp4')!r}, 2.0)):
            try:
                call()
            except ImportError as e:
                print(type(e).__name__, e)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("ImportError") and "'av' package" in line for line in lines), lines
