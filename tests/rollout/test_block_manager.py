"""The C++ block manager (csrc/, through ``vr1fast.rollout.block_manager``) against its Python twin
``kv_pool.BlockManager``: the same seeded random allocate/fork/append/free/reset/query operations on both, with
every observable (return values, page tables, slots, ref counts, free count, raised exception type and message)
equal after every operation; the part-1 invariant run on the C++ manager; the library loads without torch and links
no libtorch; the env override and the fallback notice."""
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from test_kv_pool import check_invariants, step

from vr1fast.errors import ConfigError
from vr1fast.rollout import block_manager
from vr1fast.rollout.block_manager import CppBlockManager, choose, cpp_status
from vr1fast.rollout.kv_pool import BlockManager as PyBlockManager
from vr1fast.rollout.kv_pool import KVPool

PAGE, NUM_PAGES = 4, 23
LOADED, WHERE = cpp_status()
IN_CI = os.environ.get("CI", "").lower() == "true"
needs_cpp = pytest.mark.skipif(not LOADED, reason=f"the C++ block manager is not built here: {WHERE}")


def test_library_is_built_in_ci():
    """CI builds csrc/ (scripts/setup.sh): there a missing library is a failure, not a skip."""
    if not IN_CI and not LOADED:
        pytest.skip(f"not in CI (CI=true) and the C++ block manager is not built: {WHERE}")
    assert LOADED, WHERE
    assert block_manager.BlockManager is CppBlockManager or os.environ.get(block_manager.ENV)


def outcome(call):
    """What a call gives, comparable across the two managers: its value, or its exception's type and message."""
    try:
        value = call()
    except Exception as err:  # noqa: BLE001 - the exception is the observable
        return "raised", type(err), str(err)
    if isinstance(value, torch.Tensor):
        return "tensor", value.dtype, tuple(value.shape), value.tolist()
    return "value", value


def observe(bm, issued: int, rng: random.Random) -> dict:
    """Every observable of ``bm``: free count, every page's ref count (and one outside the pool), which ids are live,
    and each live id's length, pages, parent, prefix, slots, plus a page table of the live ids in random order."""
    seen = {"free": bm.num_free, "refs": [outcome(lambda p=p: bm.refcount(p)) for p in range(-1, bm.num_pages + 1)]}
    live = []
    for seq in range(-1, issued + 2):
        seen[seq] = outcome(lambda: bm.length(seq))
        if seen[seq][0] == "value":
            live.append(seq)
            n = seen[seq][1]
            seen[seq] += tuple(outcome(f) for f in (lambda: bm.pages(seq), lambda: bm.parent(seq),
                                                    lambda: bm.prefix(seq), lambda: bm.slots(seq, 0, n)))
    rng.shuffle(live)
    seen["table"] = outcome(lambda: bm.page_table(live, rng.randint(-1, 6)))
    return seen


def random_op(rng: random.Random, live: list[int], freed: list[int], issued: int) -> tuple[str, tuple]:
    """One operation and its arguments: mostly on live ids, sometimes on freed or never-issued ones, with bad counts
    and ranges mixed in."""
    def seq() -> int:
        return rng.choice(live) if live and rng.random() < 0.85 else rng.randint(-1, issued + 1)

    op = rng.choices(["allocate", "fork", "append", "free", "double_free", "reset", "page_table", "slots",
                      "refcount"], weights=[6, 4, 10, 4, 1, 0.3, 1, 1, 1])[0]
    if op == "double_free":
        return "free", (rng.choice(freed) if freed else seq(),)
    return op, {
        "allocate": lambda: (rng.randint(-1, 3 * PAGE),),
        "fork": lambda: (seq(), rng.randint(0, 4)),
        "append": lambda: (seq(), rng.randint(0, PAGE + 1)),
        "free": lambda: (seq(),),
        "reset": lambda: (),
        "page_table": lambda: ([seq() for _ in range(rng.randint(0, 4))], rng.randint(-2, 6)),
        "slots": lambda: (seq(), rng.randint(-1, 2 * PAGE), rng.randint(-1, 3 * PAGE)),
        "refcount": lambda: (rng.choice([-1, NUM_PAGES, rng.randrange(NUM_PAGES)]),),
    }[op]()


ERRORS = ("not live", "read-only", "out of pages", "itself a fork", "outside sequence", "not in the pool",
          "at least one token", "n >= 1", "num_tokens >= 1")


def label(op: str, got: tuple, double_free: bool) -> str:
    """What an operation exercised: its name when it succeeded, else which error."""
    if got[0] != "raised":
        return op
    return "double free" if double_free else next((e for e in ERRORS if e in got[2]), f"{op}: {got[2]}")


@needs_cpp
@pytest.mark.parametrize("seed", range(6))
def test_cpp_equals_python_under_random_operations(seed):
    rng = random.Random(seed)
    py, cpp = PyBlockManager(NUM_PAGES, PAGE), CppBlockManager(NUM_PAGES, PAGE)
    live, freed, issued, done = [], [], 0, set()
    for i in range(500):
        op, args = random_op(rng, live, freed, issued)
        got = outcome(lambda: getattr(py, op)(*args))
        assert outcome(lambda: getattr(cpp, op)(*args)) == got, (i, op, args)
        done.add(label(op, got, op == "free" and args[0] in freed))
        if got[0] == "value":  # ids are handed out in order (from 0 again after a reset) and never reused
            if op == "allocate":
                issued = got[1] + 1
            elif op == "fork":
                issued = got[1][-1] + 1
            elif op == "reset":
                issued, freed = 0, []
            elif op == "free":
                freed.append(args[0])
        observe_seed = rng.random()
        seen = observe(py, issued, random.Random(observe_seed))
        assert observe(cpp, issued, random.Random(observe_seed)) == seen, (i, op, args)
        live = [s for s in range(issued) if seen[s][0] == "value"]
    assert set(ERRORS) | {"allocate", "fork", "append", "free", "double free", "reset", "page_table", "slots",
                          "refcount"} <= done, sorted(done)


@needs_cpp
def test_cpp_equals_python_on_edge_inputs():
    """Bad sizes, counts beyond the pool (the C++ page count must not overflow), empty and negative-width tables."""
    for size in [(0, PAGE), (NUM_PAGES, 0), (-1, -1)]:
        assert outcome(lambda: CppBlockManager(*size)) == outcome(lambda: PyBlockManager(*size))[:2] + (
            f"BlockManager: num_pages={size[0]} and page_size={size[1]} must be >= 1",)
    managers = PyBlockManager(NUM_PAGES, PAGE), CppBlockManager(NUM_PAGES, PAGE)
    calls = [lambda bm: bm.allocate(2 ** 63 - 1), lambda bm: bm.allocate(5), lambda bm: bm.append(0, 2 ** 63 - 1),
             lambda bm: bm.append(0, 2 ** 62), lambda bm: bm.fork(0, 3), lambda bm: bm.page_table([], -3),
             lambda bm: bm.page_table([], 2), lambda bm: bm.page_table([1, 2], -3), lambda bm: bm.slots(1, 0, 0),
             lambda bm: bm.slots(0, 5, 5), lambda bm: bm.slots(0, 2, 1), lambda bm: bm.free(0),
             lambda bm: bm.prefix(3), lambda bm: bm.pages(3), lambda bm: bm.page_table([1, 1, 3], 1)]
    for i, call in enumerate(calls):
        py, cpp = (outcome(lambda: call(bm)) for bm in managers)
        assert cpp == py, (i, py, cpp)
    assert outcome(lambda: managers[1].length(2 ** 63)) == (
        "raised", ValueError, f"block manager: sequence {2 ** 63} does not fit in int64")


@needs_cpp
@pytest.mark.parametrize("seed", [0, 1])
def test_cpp_keeps_the_part1_invariants(seed):
    """test_kv_pool's random run (every written slot intact, ref counts = live holders) on the C++ manager."""
    rng = random.Random(seed)
    pool = KVPool(1, NUM_PAGES, PAGE, 1, 1, dtype=torch.float64)
    pool.blocks = CppBlockManager(NUM_PAGES, PAGE)
    pool.k.fill_(-1.0)
    live, freed, done = {}, [], []
    for _ in range(400):
        done.append(step(rng, pool, live, freed))
        check_invariants(pool, live)
    assert {"allocate", "fork", "append", "append_shared", "free", "double_free", "full"} <= set(done)


NO_TORCH = """
import ctypes, importlib.util, sys
assert importlib.util.find_spec("torch") is None, "torch is importable here"
lib = ctypes.PyDLL(sys.argv[1])
i64, ptr = ctypes.c_int64, ctypes.c_void_p
for name, args in [("bm_create", [i64, i64]), ("bm_allocate", [ptr, i64]), ("bm_fork", [ptr, i64, i64]),
                   ("bm_append", [ptr, i64, i64]), ("bm_page_table", [ptr, ptr, i64, i64, ptr]),
                   ("bm_destroy", [ptr])]:
    getattr(lib, name).argtypes = args
    getattr(lib, name).restype = ptr if name == "bm_create" else i64
bm = lib.bm_create(8, 4)
prompt = lib.bm_allocate(bm, 6)
first = lib.bm_fork(bm, prompt, 2)
lib.bm_append(bm, first + 1, 5)
seqs, table = (i64 * 3)(prompt, first, first + 1), (ctypes.c_int32 * 6)()
assert lib.bm_page_table(bm, seqs, 3, 2, table) == 0
lib.bm_destroy(bm)
print(list(table))
"""


@needs_cpp
def test_library_loads_where_torch_is_not_importable():
    """The binary needs no torch: it runs in an isolated interpreter without site-packages (-I -S)."""
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", NO_TORCH, WHERE], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[0] == "[0, 1, -1, -1, 2, 3]"


@needs_cpp
@pytest.mark.skipif(shutil.which("ldd") is None, reason="no ldd on this machine")
def test_library_links_no_torch_and_no_python():
    """Its dynamic dependencies (ldd: NEEDED and theirs) are the C library only: no libtorch, libc10, libpython or
    libstdc++ (linked in statically), so it loads under any torch and any C++ runtime."""
    deps = subprocess.run(["ldd", WHERE], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in deps.strip().splitlines()]
    assert any(name.startswith("libc.so") for name in names), deps
    assert not [n for n in names if any(bad in n for bad in ("torch", "c10", "python", "stdc++", "cuda"))], deps


def test_choose_and_the_notice(monkeypatch, caplog):
    caplog.set_level("INFO", logger=block_manager.__name__)
    assert choose("python") is PyBlockManager
    assert caplog.records[-1].getMessage() == "block manager: Python (kv_pool.BlockManager), as " \
                                              "VR1FAST_BLOCK_MANAGER=python asks"
    with pytest.raises(ConfigError, match="VR1FAST_BLOCK_MANAGER='rust': expected auto, cpp or python"):
        choose("rust")
    if LOADED:
        assert choose("auto") is choose("cpp") is CppBlockManager
        assert caplog.records[-1].getMessage() == f"block manager: C++ ({WHERE})"
    monkeypatch.setattr(block_manager, "_lib", None)
    monkeypatch.setattr(block_manager, "_where", "vr1fast._C is not built")
    assert choose("auto") is PyBlockManager
    assert caplog.records[-1].levelname == "WARNING"
    assert caplog.records[-1].getMessage().endswith("the C++ one does not load: vr1fast._C is not built")
    with pytest.raises(ConfigError, match="=cpp but the C\\+\\+ block manager does not load: vr1fast._C is not"):
        choose("cpp")
    with pytest.raises(ConfigError, match="does not load"):
        CppBlockManager(4, PAGE)


ENV_OVERRIDE = """
import importlib, os
from vr1fast.rollout import block_manager
for name in ("PYTHON", "cpp" if block_manager.cpp_status()[0] else "python", "auto"):
    os.environ["VR1FAST_BLOCK_MANAGER"] = name
    importlib.reload(block_manager)
    print(name, block_manager.BlockManager.__module__, block_manager.BlockManager.__name__)
"""


def test_env_override_picks_the_manager():
    """VR1FAST_BLOCK_MANAGER, read at import (reloaded here for each value)."""
    proc = subprocess.run([sys.executable, "-c", ENV_OVERRIDE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, block_manager.ENV: "python"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    python, cpp = "vr1fast.rollout.kv_pool BlockManager", "vr1fast.rollout.block_manager CppBlockManager"
    assert proc.stdout.splitlines() == [f"PYTHON {python}", f"cpp {cpp}" if LOADED else f"python {python}",
                                        f"auto {cpp if LOADED else python}"]
