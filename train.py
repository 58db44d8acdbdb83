"""Train an ESM2-style protein masked language model.

    python train.py --config config/sample.yaml               # CPU, the shipped sample
    torchrun --nproc_per_node=8 train.py --device cuda        # the speedrun on 8 GPUs

config -> backend, data, model, optimizer -> the loop below. Everything device-specific is in
runtime/ (the backends); the run log, checkpoints and the config are in training/, the
benchmark in evaluation/. Options: the keys of config/speedrun.yaml, given as --key value.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from data.benchmark import EvalLoader
from data.buckets import micro_batch_shapes
from data.loader import TrainLoader
from data.masking import MaskingConfig
from data.shards import ShardError
from evaluation.benchmark import BENCH_LENGTH, evaluate
from model import build_model, flops_per_token, param_counts, t_eff
from model.config import doc_alignment
from optim import apply_schedule, build_optimizer
from optim.autoclip import AutoClip
from runtime.backend import leave
from runtime.devices import get_backend
from training import checkpoint
from training.config import ConfigError, doc_multiple, load_config, model_config, optim_config
from training.data_setup import resolve_data, split_digest
from training.precompile import kinds_text, precompile, precompile_wanted
from training.profiling import StepProfiler, parse_steps
from training.runlog import RunLog, environment
from training.sinks import make_sink


def train_step(model, batches, optimizer, backend, grad_clip, attn_window=None):
    """One optimizer step over the micro-batches of this rank (DESIGN, "The training loss").

    Each micro-batch's backward is of its summed cross-entropy; the optimizer step then scales
    the gradients by world_size / (global target count), which leaves the gradient of
    sum(CE over every target of the step) / count after DDP's average. Everything stays on the
    device (the count too, built from the device labels and all-reduced), so a step that does
    not log never waits for the device. Under masked diffusion the batches carry loss_weights
    (each target's CE times 1/t) and loss_counted (the denominator counts every residue).
    attn_window: None, or a 0-d CPU tensor that travels with each micro-batch, so a growing
    window is a graph input, never a constant. A micro-batch marked whole_rows (every row one
    document) attends without a mask. Returns device tensors: (summed loss of this
    rank, global target count, real tokens of this rank, pre-clip grad norm, step taken)."""
    loss_sum = torch.zeros((), device=backend.device)
    count = real = torch.zeros((), dtype=torch.long, device=backend.device)  # exact at any size
    for i, batch in enumerate(batches):
        whole = batch.get("whole_rows", False)  # a host flag: it picks the graph, never travels
        tensors = {k: v for k, v in batch.items() if k != "whole_rows"}
        batch = backend.to_device(tensors if attn_window is None else {**tensors, "attn_window": attn_window})
        counted = batch["loss_counted"] if "loss_counted" in batch else batch["labels"] != -100
        count = count + counted.sum()
        real = real + (batch["doc_ids"] >= 0).sum()
        with backend.no_sync(model, last_micro=i == len(batches) - 1):
            with backend.autocast():
                _, loss = model(batch["input_ids"], batch["doc_ids"], batch["labels"],
                                loss_weights=batch.get("loss_weights"), window=batch.get("attn_window"),
                                whole_rows=whole)
            loss.backward()
        loss_sum = loss_sum + loss.detach().float()
    count = backend.all_reduce_sum(count)
    grad_norm, stepped = backend.optimizer_step(model, optimizer, grad_clip,
                                                scale=backend.world_size / count.clamp(min=1.0))
    return loss_sum, count, real, grad_norm, stepped


def report_profile(paths, log, progress) -> None:
    if paths:
        log.message(f"profile: {paths[0]} (open in Perfetto or chrome://tracing); operators by time: {paths[1]}; "
                    "the profiled steps' times include the profiler's overhead", echo=progress.write)


class Stop:
    """SIGTERM/SIGINT ask the loop to save a checkpoint and leave at the next agreed point."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: leave now
            raise KeyboardInterrupt
        self.requested = True


def run(cfg) -> int:
    backend = get_backend(cfg.device, cfg)
    backend.init_distributed()
    failed = True
    try:
        rc = _run(cfg, backend)
        failed = False
        return rc
    finally:
        backend.shutdown(failed=failed)


def _run(cfg, backend) -> int:
    rows = cfg.micro_batch_rows(backend.world_size)
    cfg.log_name = backend.broadcast_object(cfg.log_name or f"{Path(cfg.config_file).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(cfg.checkpoint_dir) / cfg.log_name
    log = RunLog(Path(cfg.log_dir) / cfg.log_name, enabled=backend.is_main, total_steps=cfg.num_steps)
    resume_from = checkpoint.resolve(cfg.resume, run_dir) if cfg.resume else None
    if resume_from is None and log.txt.exists():
        raise ConfigError(f"{log.txt} already exists and there is no checkpoint under {run_dir} to resume; "
                          "choose another --log_name or remove the old log.")

    files = resolve_data(cfg, backend)
    masking = MaskingConfig(rule=cfg.mask_rule, rate=cfg.mask_rate, rate_start=cfg.mask_rate_start or None,
                            rate_schedule_steps=cfg.mask_rate_steps,
                            diffusion=cfg.diffusion_rate_per if cfg.masked_diffusion else "",
                            diffusion_from=cfg.mask_rate_steps)
    loader = TrainLoader(files.train, rows, cfg.max_length, rank=backend.rank, world_size=backend.world_size,
                         seed=cfg.seed, masking=masking, micro_steps_per_step=cfg.grad_accum, crop=cfg.crop,
                         doc_multiple=doc_multiple(cfg), length_buckets=cfg.length_buckets,
                         whole_rows=cfg.whole_rows)
    eval_rows = max(1, cfg.eval_batch_size // BENCH_LENGTH)
    # evaluation lays each sequence where the model sees it whole (the Patch UNet's merge grid)
    eval_loader = lambda split: EvalLoader(getattr(files, split), eval_rows, BENCH_LENGTH, rank=backend.rank,
                                           world_size=backend.world_size, doc_multiple=doc_alignment(mcfg))

    torch.manual_seed(cfg.seed)  # the model is built on the CPU, so every device starts alike
    mcfg = model_config(cfg, **backend.model_defaults())
    backend.check_trainable(mcfg)
    profile_steps = parse_steps(cfg.profile_steps, cfg.num_steps)
    activities = backend.profiler_activities() if profile_steps else ()  # a device that cannot: refused here
    ocfg = optim_config(cfg)
    model = build_model(mcfg)
    counts = param_counts(model)
    model = backend.prepare_model(model, cfg)
    optimizer = build_optimizer(backend.unwrap(model), ocfg, distributed=backend.world_size > 1,
                                fused=backend.fused_adamw, ns_dtype=backend.muon_dtype)
    clip = AutoClip.from_config(ocfg, backend.device)  # grad_clip: a number, None, or auto's history
    auto = clip if isinstance(clip, AutoClip) else None

    # warmup_time: the first step of every process (compilation, allocator and cache warm-up),
    # timed apart and left out of train_time, as the speedrun convention asks.
    state = {"step": 0, "train_time": 0.0, "warmup_time": 0.0, "warmup_steps": 0, "tokens": 0,
             "tokens_all": 0, "skipped": 0, "skipped_in_row": 0}
    if resume_from is not None:
        common, mine = checkpoint.load(resume_from, backend.rank, backend.world_size)
        checkpoint.check_same_run(common, asdict(mcfg), cfg.identity(), resume_from)
        backend.load_model_state(model, common["model"])
        # in the rank's file when it was its own (FSDP2, or a checkpoint written before)
        backend.load_optimizer_state(model, optimizer, mine.get("optimizer", common.get("optimizer")))
        if auto:
            auto.load_state_dict(common["auto_clip"])
        loader.load_state_dict(mine["loader"])
        backend.set_rng_state(mine["rng"])
        state.update(common["state"])

    config_dict = cfg.to_dict()
    notes = {"params": counts["total"], "params_non_embedding": counts["non_embedding"],
             "params_matmul": counts["matmul"], "micro_batch": micro_batch_shapes(rows, cfg.max_length, cfg.length_buckets),
             "resumed_from": str(resume_from) if resume_from else "-",
             **({"valid_sha256": split_digest(files.valid), "test_sha256": split_digest(files.test)}
                if backend.is_main else {})}
    log.header(config_dict, environment(backend), extra_sources=[cfg.config_file], notes=notes)
    for note in (*cfg.notes, *backend.notes()):
        log.message(note)
    sink = make_sink(cfg, config_dict, backend.is_main)

    def save():
        common = {"model": backend.model_state_dict(model), "model_config": asdict(mcfg),
                  "identity": cfg.identity(), "config": config_dict, "state": dict(state)}
        mine = {"loader": loader.state_dict(), "rng": backend.rng_state()}
        # replicated state goes once into common.pt (rank 0 writes it), a rank's own into its file
        (common if backend.replicated_optimizer_state else mine)["optimizer"] = \
            backend.optimizer_state_dict(model, optimizer)
        if auto:  # the same on every rank: every rank clips with the same global norm
            common["auto_clip"] = auto.state_dict()
        path = checkpoint.save(run_dir, state["step"], common, mine, backend, cfg.keep_checkpoints)
        log.message(f"checkpoint:{path}")

    def run_eval(split, max_batches=0, prefix="val"):
        m = evaluate(model, eval_loader(split), backend, max_batches)
        fields = {"step": state["step"], **{f"{prefix}_{k}": v for k, v in m.items()}, **backend.log_fields()}
        log.line("eval", fields, echo=progress.write)
        sink.log(fields, state["step"])
        return m

    progress = Progress(cfg.num_steps, state["step"], backend.is_main)
    profiler = StepProfiler(profile_steps, activities, Path(cfg.log_dir) / f"{cfg.log_name}.profile",
                            backend.rank, backend.sync)
    stop = Stop()
    agreed = {"stop": False}  # set in a step closure, so every rank leaves at the same step
    window = {"start": 0.0, "all": 0}
    peak = backend.peak_flops()
    end = cfg.num_steps if not cfg.steps_this_run else min(cfg.num_steps, state["step"] + cfg.steps_this_run)

    def on_log(elapsed, loss, real, total, stop_votes, lr, teff, warmup, norm, skipped, in_row, clip_at):
        new = int(skipped) - state["skipped"]
        state["skipped"], state["skipped_in_row"] = int(skipped), int(in_row)
        if new:  # read here, on logging steps only: the steps between never wait for the device
            log.message(f"step:{state['step']} skipped: non-finite gradient norm in {new} step(s) since "
                        f"the last logged step (last norm {norm})", echo=progress.write)
        if warmup:
            state["warmup_time"] += elapsed
            state["warmup_steps"] += 1
        else:
            state["train_time"] += elapsed
        state["tokens"] += int(real)
        state["tokens_all"] += int(total)
        agreed["stop"] = stop_votes > 0
        tps = real / elapsed
        mfu = flops_per_token(mcfg, teff) * tps / (peak * backend.world_size) if peak else None
        timed_steps = state["step"] - state["warmup_steps"]
        fields = {"step": state["step"], "loss": loss, "lr": lr,
                  **({"clip": clip_at if clip_at < float("inf") else None} if auto else {}),
                  "tokens": state["tokens"], "tok/s": tps,
                  "tok/s_all": total / elapsed, "mfu": mfu, "train_time": state["train_time"],
                  "step_avg": 1000 * state["train_time"] / timed_steps if timed_steps else None,
                  "pad": 1 - real / total, **backend.memory_stats(), **backend.log_fields(),
                  **({"warmup_time": state["warmup_time"]} if warmup else {})}
        log.line("step", fields, echo=progress.write)
        sink.log(fields, state["step"])
        progress.update(state["step"], loss)

    # Device-side counters of skipped (non-finite) steps, read on logging steps only.
    skipped = torch.full((), state["skipped"], dtype=torch.long, device=backend.device)
    in_row = torch.full((), state["skipped_in_row"], dtype=torch.long, device=backend.device)
    window_real = torch.zeros((), dtype=torch.long, device=backend.device)
    it = iter(loader)
    precompiling = precompile_wanted(cfg.precompile, backend, len(loader.kinds()))
    backend.sync()
    window["start"] = time.perf_counter()
    first_step = state["step"] + 1  # this process's warm-up step
    while state["step"] < end and not agreed["stop"] and state["skipped_in_row"] < cfg.max_skipped_steps:
        batches = [next(it) for _ in range(cfg.grad_accum)]
        window["all"] += sum(b["doc_ids"].numel() for b in batches)  # shapes only: no read
        apply_schedule(optimizer, state["step"], ocfg, cfg.num_steps)
        lr = max(g["lr"] for g in optimizer.param_groups)  # the largest group's LR, for the log
        if cfg.masked_diffusion and state["step"] == cfg.mask_rate_steps:  # the loader switches here too
            log.message(f"step:{state['step']} masked diffusion from step {state['step'] + 1} on: the train loss is "
                        "now the diffusion bound per residue (docs/training.md)", echo=progress.write)
        # a fresh 0-d CPU tensor each step: the window reaches the graph as data, never as a constant
        attn_window = torch.tensor(cfg.attn_window_at(state["step"])) if cfg.attn_window else None
        profiler.before(state["step"] + 1)
        loss_sum, count, real, grad_norm, stepped = train_step(model, batches, optimizer, backend, clip, attn_window)
        if state["step"] + 1 == first_step and precompiling and first_step < end:  # in the warm-up step's time
            runs = precompile(loader, first_step, cfg.grad_accum,
                              lambda b, w=attn_window: train_step(model, b, optimizer, backend, clip, w),
                              backend, model, optimizer, auto)
            log.message(f"precompile: {runs} step(s) of every kind of micro-batch ({kinds_text(loader.kinds())}) "
                        "traced in the warm-up step, then undone", echo=progress.write)
        window_real = window_real + real
        skipped = skipped + (~stepped).long()
        in_row = torch.where(stepped, 0, in_row + 1)
        state["step"] += 1
        step = state["step"]
        evaluating = step == cfg.num_steps or (cfg.eval_every and step % cfg.eval_every == 0)
        on_save_step = cfg.save_every and step % cfg.save_every == 0
        warmup = step == first_step
        profiled = step == profiler.last  # logged, so that writing the profile is not train time
        if step % cfg.log_every == 0 or step == end or evaluating or on_save_step or warmup or profiled:
            votes = torch.full((), int(stop.requested), dtype=torch.long, device=backend.device)
            totals = backend.all_reduce_sum(torch.stack([window_real, votes]))
            loss = backend.all_reduce_sum(loss_sum) / count
            backend.sync()  # the window's wall time is measured here, on the host, not in the closure
            elapsed = time.perf_counter() - window["start"]
            backend.step_closure(on_log, elapsed, loss, totals[0], window["all"] * backend.world_size, totals[1],
                                 lr, sum(t_eff(b["doc_ids"]) for b in batches) / len(batches), warmup,
                                 grad_norm, skipped, in_row, auto.threshold if auto else None)
            window.update(all=0)
            window_real = torch.zeros((), dtype=torch.long, device=backend.device)
            report_profile(profiler.after(step), log, progress)
            # never save over good checkpoints while steps are being skipped
            saving = on_save_step and not state["skipped_in_row"]
            if evaluating and step < cfg.num_steps:
                run_eval("valid", cfg.eval_max_batches)
            if saving or (agreed["stop"] and step < cfg.num_steps) or (step == end and step < cfg.num_steps):
                save()
            window["start"] = time.perf_counter()  # evaluation and checkpoints are not train time
    report_profile(profiler.close(), log, progress)  # a run that stopped inside the window
    progress.close()

    if state["skipped_in_row"] >= cfg.max_skipped_steps:
        log.message(f"stopped: {cfg.max_skipped_steps} steps in a row had a non-finite gradient; "
                    f"the last good checkpoint is in {run_dir}; lower the learning rate or resume from it.")
        sink.finish()
        return 3
    if state["step"] < cfg.num_steps:
        why = "stopped by a signal" if agreed["stop"] else "paused (steps_this_run)"
        log.message(f"{why} at step {state['step']}/{cfg.num_steps}; continue with --resume auto --log_name {cfg.log_name}")
        sink.finish()
        return 0
    final = run_eval("valid")
    test = run_eval("test", prefix="test")
    if not (cfg.save_every and state["step"] % cfg.save_every == 0):
        save()
    summary = {"step": state["step"], **{f"val_{k}": v for k, v in final.items()},
               **{f"test_{k}": v for k, v in test.items()}, "train_time": state["train_time"],
               "warmup_time": state["warmup_time"],
               "tokens": state["tokens"], "tokens_all": state["tokens_all"], "skipped_steps": state["skipped"],
               **backend.memory_stats(), **backend.log_fields()}
    log.summary(summary)
    sink.finish()
    return 0


class Progress:
    """A tqdm bar when stdout is a terminal; otherwise the log lines themselves are the progress."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True)
        self.last = initial

    def write(self, text: str) -> None:
        (self.bar.write if self.bar else print)(text)

    def update(self, step: int, loss: float) -> None:
        if self.bar:
            self.bar.update(step - self.last)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        self.last = step

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def main(argv: list[str]) -> int:
    try:
        return run(load_config(argv))
    except (ConfigError, ShardError, FileNotFoundError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    leave(main(sys.argv[1:]))
