"""Prefetching workers (``data.prefetch_workers``) on the synthetic set's real encoded videos: the same samples,
frames (bit for bit), skip counts and positions as the synchronous path for two ranks with ``train.grad_accum`` > 1,
and for T-GRPO the same ordered and shuffled ``PromptBatch`` pairs, prepared in the workers with their own tokenizer
copies; a broken file inside a prefetched window raises the same error at the same call (or, with
``data.skip_bad``, gives the same replacements); a training run logs the same metrics, and a resume from its
checkpoint continues as the synchronous run does."""
import json
import threading
from dataclasses import fields, replace
from functools import partial

import pytest
import torch

from media import make_broken_media
from runs import comparable, small
from vr1fast import dist
from vr1fast.config import ConfigError, demo, validate
from vr1fast.data.dataset import Position, Sampler, load_records
from vr1fast.data.loader import next_prompts, run_records
from vr1fast.data.prefetch import PromptStream
from vr1fast.errors import MediaError
from vr1fast.metrics import read_jsonl
from vr1fast.model.tokenizer import build_tiny_tokenizer
from vr1fast.train import _prepare, _step_seed, main


def config(synthetic, **data):
    cfg = demo()
    cfg.data = replace(cfg.data, synthetic_dir=str(synthetic), synthetic_size=8, prefetch_workers=2,
                       prefetch_depth=3, **data)
    cfg.train = replace(cfg.train, prompts_per_rank=2, grad_accum=2)
    return cfg


def run_calls(cfg, steps, fetch):
    """``fetch(position, step, micro)`` for ``steps`` steps of ``grad_accum`` calls from the start, each from the
    position the last returned; a ``MediaError`` ends the list as ``("error", message)``."""
    position, out = Position(), []
    for step in range(steps):
        for micro in range(cfg.train.grad_accum):
            try:
                got = fetch(position, step, micro)
            except MediaError as e:
                out.append(("error", str(e)))
                return out
            position = got[3]
            out.append(got)
    return out


def calls(cfg, records, rank, world_size, steps, stream=None):
    """``steps`` steps of ``grad_accum`` calls from the start, synchronous or through ``stream``."""
    sampler = Sampler(len(records), cfg.train.seed, cfg.data.shuffle)

    def fetch(position, step, micro):
        seed = dist.step_seed(cfg.train.seed, step, rank, micro)
        return stream.next_prompts(position, seed) if stream else next_prompts(
            records, sampler, position, cfg, rank=rank, world_size=world_size, seed=seed)
    return run_calls(cfg, steps, fetch)


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x[0] == "error":
            assert x == y
            continue
        assert x[0] == y[0] and x[2:] == y[2:]  # samples, skipped, position
        assert all(torch.equal(u, v) for u, v in zip(x[1], y[1])) and len(x[1]) == len(y[1])


def stream_calls(cfg, records, rank, world_size, steps):
    with PromptStream(records, Sampler(len(records), cfg.train.seed, cfg.data.shuffle), cfg, rank=rank,
                      world_size=world_size) as stream:
        return calls(cfg, records, rank, world_size, steps, stream)


def prepared_calls(cfg, records, rank, world_size, steps, stream=None, tokenizer=None):
    """``calls`` as the T-GRPO step makes them: with ``stream``, ``next_prepared`` (the pair made by a worker);
    without, ``next_prompts`` and ``train._prepare`` here (``tokenizer``)."""
    sampler = Sampler(len(records), cfg.train.seed, cfg.data.shuffle)

    def fetch(position, step, micro):
        if stream:
            return stream.next_prepared(position, step, micro)
        seed = _step_seed(cfg, rank, step, micro)
        got = next_prompts(records, sampler, position, cfg, rank=rank, world_size=world_size, seed=seed)
        return (*got, _prepare(cfg, tokenizer, got[0], got[1], seed))
    return run_calls(cfg, steps, fetch)


def same_pairs(a, b):
    """``same`` on the first four items, and equal pairs: every ``PromptBatch`` tensor, rows and permutations."""
    same([x[:4] for x in a], [y[:4] for y in b])
    for x, y in zip(a, b):
        if x[0] == "error":
            continue
        p, q = x[4], y[4]
        assert p.video_rows == q.video_rows and len(p.permutations) == len(q.permutations)
        assert all(torch.equal(u, v) for u, v in zip(p.permutations, q.permutations))
        for u, v in ((p.ordered, q.ordered), (p.shuffled, q.shuffled)):
            assert (u is None) == (v is None)
            for f in fields(u) if u is not None else ():
                s, t = getattr(u, f.name), getattr(v, f.name)
                assert (s is None and t is None) or torch.equal(s, t), f.name


def prepared_stream(cfg, records, rank, world_size, tokenizer, prepare=None):
    return PromptStream(records, Sampler(len(records), cfg.train.seed, cfg.data.shuffle), cfg, rank=rank,
                        world_size=world_size, prepare=prepare or partial(_prepare, cfg), tokenizer=tokenizer,
                        seed_of=partial(_step_seed, cfg, rank))


def test_two_ranks_get_the_synchronous_batches(synthetic):
    cfg = config(synthetic)
    records = run_records(cfg.data)
    for rank in (0, 1):  # 2 steps × 2 micro-batches × 2 prompts × 2 ranks = 16 draws: two epochs of 8
        same(stream_calls(cfg, records, rank, 2, steps=2), calls(cfg, records, rank, 2, steps=2))
    assert not [t for t in threading.enumerate() if t.name.startswith("vr1fast-prefetch")]  # joined on close


def test_two_ranks_get_the_synchronous_prompt_pairs_from_workers_with_their_own_tokenizers(synthetic):
    """3 steps × grad_accum 2: each (position, step, micro) prepared ahead in a worker equals the step's own."""
    cfg, tokenizer, seen = config(synthetic), build_tiny_tokenizer(), set()
    records = run_records(cfg.data)

    def prepare(tok, *args):
        seen.add((threading.current_thread().name.startswith("vr1fast-prefetch"), id(tok)))
        return _prepare(cfg, tok, *args)

    for rank in (0, 1):
        with prepared_stream(cfg, records, rank, 2, tokenizer, prepare) as stream:
            got = prepared_calls(cfg, records, rank, 2, 3, stream)
            assert stream.restarts == 1  # only the first call was not prefetched
        same_pairs(got, prepared_calls(cfg, records, rank, 2, 3, tokenizer=tokenizer))
    assert {in_worker for in_worker, _ in seen} == {True} and id(tokenizer) not in {i for _, i in seen}
    assert len({i for _, i in seen}) <= 4  # one copy per worker, per stream


def test_a_call_off_the_prediction_is_prepared_again(synthetic):
    """A call at the predicted position but another (step, micro) than predicted does not take the prepared
    window (its seed differs): it is prepared again with its own seed."""
    cfg, tokenizer = config(synthetic), build_tiny_tokenizer()
    records = run_records(cfg.data)
    sampler = Sampler(len(records), cfg.train.seed, cfg.data.shuffle)
    with prepared_stream(cfg, records, 0, 1, tokenizer) as stream:
        after = stream.next_prepared(Position(), 0, 0)[3]
        for step, micro in ((5, 1), (6, 0)):  # (0, 1) predicted; then (5, 2) -> (6, 0) with grad_accum 2
            seed = _step_seed(cfg, 0, step, micro)
            want = next_prompts(records, sampler, after, cfg, rank=0, world_size=1, seed=seed)
            want = (*want, _prepare(cfg, tokenizer, want[0], want[1], seed))
            got = stream.next_prepared(after, step, micro)
            same_pairs([got], [want])
            after = got[3]
        assert stream.restarts == 2  # the first call and (5, 1); (6, 0) was predicted from (5, 1)


def test_a_position_off_the_prediction_restarts_from_it(synthetic):
    """A resume (or any caller moving the position) discards the work in flight: the answer is still exact."""
    cfg = config(synthetic)
    records = run_records(cfg.data)
    sampler = Sampler(len(records), cfg.train.seed, cfg.data.shuffle)
    want = next_prompts(records, sampler, Position(0, 6), cfg, rank=0, world_size=1, seed=7)
    with PromptStream(records, sampler, cfg, rank=0, world_size=1) as stream:
        stream.next_prompts(Position(), 1)
        same([stream.next_prompts(Position(0, 6), 7)], [want])


def broken_set(synthetic, tmp_path, at):
    """The synthetic set's records in file order, record ``at`` pointing at a truncated mp4."""
    items = json.loads((synthetic / "rl.json").read_text())
    for item in items:
        item["path"] = str(synthetic / item["path"])
    items[at] = {**items[at], "data_type": "video",
                 "path": str(make_broken_media(tmp_path / "broken")["truncated"])}
    (tmp_path / "rl.json").write_text(json.dumps(items))
    return tmp_path / "rl.json"


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_broken_file_inside_a_prefetched_window(synthetic, tmp_path, skip_bad):
    """Record 5 is decoded (and fails) while calls 0..2 are consumed; the error comes at its own call, naming it."""
    cfg = config(synthetic, path=str(broken_set(synthetic, tmp_path, 5)), shuffle=False, skip_bad=skip_bad)
    cfg.train = replace(cfg.train, prompts_per_rank=1)
    records = load_records(cfg.data.path, cfg.data)
    want = calls(cfg, records, 0, 1, steps=4)
    same(stream_calls(cfg, records, 0, 1, steps=4), want)
    tokenizer = build_tiny_tokenizer()
    with prepared_stream(cfg, records, 0, 1, tokenizer) as stream:  # the worker's error, raised at its call
        same_pairs(prepared_calls(cfg, records, 0, 1, 4, stream), prepared_calls(cfg, records, 0, 1, 4,
                                                                                  tokenizer=tokenizer))
    if skip_bad:
        assert sum(w[2] for w in want) >= 1 and len(want) == 8
    else:
        assert len(want) == 6 and want[-1][0] == "error" and "truncated.mp4" in want[-1][1]


def test_config_checks():
    for key, value in (("prefetch_workers", -1), ("prefetch_depth", 0)):
        cfg = demo()
        cfg.data = replace(cfg.data, **{key: value})
        with pytest.raises(ConfigError, match=f"data.{key}"):
            validate(cfg)


def test_training_metrics_and_resume_match_the_synchronous_run(synthetic, tmp_path):
    steps = ["--train.max_steps=3", "--train.grad_accum=2", "--metrics.tensorboard=false", "--metrics.plot=false"]
    main(small(synthetic, tmp_path / "sync", *steps))
    main(small(synthetic, tmp_path / "prefetch", *steps, "--data.prefetch_workers=2", "--train.save_every=1",
               "--train.save_total_limit=0"))
    sync = comparable(read_jsonl(tmp_path / "sync" / "metrics.jsonl"))
    assert comparable(read_jsonl(tmp_path / "prefetch" / "metrics.jsonl")) == sync and len(sync) == 3
    first = sorted((tmp_path / "prefetch" / "checkpoints").iterdir())[0]  # after step 1
    main(small(synthetic, tmp_path / "resumed", *steps, "--data.prefetch_workers=2", f"--train.resume={first}"))
    assert comparable(read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == sync[1:]


def test_a_failing_run_stops_its_workers(synthetic, tmp_path, capsys):
    """The broken record of step 2 stops the run with the one-line error naming it, and no worker is left."""
    data = broken_set(synthetic, tmp_path, 1)
    with pytest.raises(SystemExit) as e:
        main(small(synthetic, tmp_path / "run", "--train.max_steps=3", f"--data.path={data}", "--data.shuffle=false",
                   "--data.prefetch_workers=2", "--metrics.tensorboard=false", "--metrics.plot=false"))
    assert e.value.code == 1 and "truncated.mp4" in capsys.readouterr().err
    assert not [t for t in threading.enumerate() if t.name.startswith("vr1fast-prefetch")]


def test_a_worker_runs_torch_in_an_openmp_team_of_one():
    """Default-size teams in the workers slowed the demo's rollout ~2x on 2 cores (vr1fast.data.prefetch); the main
    thread keeps its thread count (and with it the float summation order)."""
    from vr1fast.data.prefetch import _one_openmp_thread, _openmp_runtime

    runtime, before, seen = _openmp_runtime(), torch.get_num_threads(), []
    assert runtime is not None  # torch's libgomp on Linux wheels
    worker = threading.Thread(target=lambda: (_one_openmp_thread(), seen.append(runtime.omp_get_max_threads())))
    worker.start()
    worker.join()
    assert seen == [1] and torch.get_num_threads() == before and runtime.omp_get_max_threads() == before
