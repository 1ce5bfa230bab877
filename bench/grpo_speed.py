"""GRPO steps/s: lmforge (rollouts on its own engine, in process) vs TRL's GRPOTrainer (rollouts with
``transformers.generate``), side by side on the same model, prompts, reward, G, batch and fine-tuning mode.

    python bench/grpo_speed.py --model /tmp/tiny --steps 10                 # a tiny HF-layout Llama, full FT
    python bench/grpo_speed.py --model $(lmforge smollm2) --lora-r 16 --steps 5 --max-tokens 32
    # an RLVR setting: the built-in arithmetic task (numeric_match reward) under a system prompt with instructions
    # and two worked examples (bench/data/grpo_math_system.txt, ~345-token prompts)
    python bench/grpo_speed.py --model $(lmforge smollm2) --lora-r 16 --max-tokens 64 --task arithmetic \
        --system-prompt bench/data/grpo_math_system.txt

Needs ``pip install --no-deps trl`` (its dependencies transformers, accelerate, datasets are lmforge's).  Prints,
per framework, seconds per step and where the time goes: lmforge from its own per-step timings (rollout, reference
log-probs, train = forward + backward + optimiser, weight sync), TRL from timers around its methods.  The default
task is 64 one-line prompts scored by ``token_fraction`` (share of the completion made of the letter "e"); ``--task``
takes a built-in RL task (its prompts and its reward, the same Python function in both frameworks) and
``--system-prompt FILE`` puts a system message before every prompt.  KL off (beta 0) in both, so both do the same
work: rollouts, one policy forward + backward, an optimiser step.  The same settings go to both: G, prompts per step,
completion length, LoRA r / alpha / targets (or full fine-tuning), lr, temperature 1, top-p 1, no top-k, float32
weights, torch threads, and no gradient checkpointing (TRL's GRPOConfig turns it on by default, lmforge has none:
``--trl-gradient-checkpointing`` keeps TRL's default; ``--trl-micro-batch`` bounds TRL's activation memory instead,
which long prompts need: 16 rows of 345 + 64 tokens at once took TRL's process past 16 GB and the OOM killer).  TRL's split is measured by timing its ``_generate`` and
``_calculate_rewards`` methods; ``train_s`` is the rest of its step.  The first ``--warmup`` steps of each process are
left out of the averages (one-time costs).  The machine is shared: quote ``uptime`` with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[str]:
    return [f"Say something about topic {i}." for i in range(n)]


def task_items(args) -> tuple[list[dict], str]:
    """The benchmark's prompts (chat messages) with the fields their reward reads, and the reward spec."""
    system = [{"role": "system", "content": Path(args.system_prompt).read_text(encoding="utf-8").strip()}] \
        if args.system_prompt else []
    if args.task == "topics":
        return [{"prompt": system + [{"role": "user", "content": p}], "token": "e"} for p in prompts(64)], \
            "token_fraction"
    from lmforge.rl import tasks as T

    task = T.generate(args.task, 64, 0, seed=0)
    return [{"prompt": system + it.messages(), **it.fields} for it in task.train], task.reward


def run_lmforge(args, work: Path) -> dict:
    from lmforge.rl import grpo

    items, reward_spec = task_items(args)
    task = work / "task.jsonl"
    task.write_text("".join(json.dumps(it) + "\n" for it in items))
    mode = {"lora_r": args.lora_r, "lora_alpha": 2.0 * args.lora_r} if args.lora_r else {"full": True}
    cfg = grpo.Config(model=args.model, task=str(task), reward=reward_spec, group_size=args.group_size,
                      prompts_per_step=args.prompts_per_step, max_steps=args.steps, max_tokens=args.max_tokens,
                      lr=args.lr, beta=0.0, test_size=0, eval_every=10**6, checkpoint_every=10**6, samples=0,
                      tensorboard=False, threads=args.threads, rollout_dtype=args.rollout_dtype,
                      rollout_quantize=args.rollout_quantize, max_model_len=args.max_model_len, **mode)
    t0 = time.time()
    grpo.run(cfg, work / "lmforge", force=True)
    total = time.time() - t0
    recs = [json.loads(l) for l in (work / "lmforge" / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    steps = [{k: r[k] for k in ("rollout_s", "ref_s", "train_s", "sync_s", "completion_len", "rollout_is_mean",
                                "rollout_is_capped") if k in r} for r in recs]
    recs = recs[args.warmup:]
    parts = {k: sum(r[k] for r in recs) / len(recs) for k in ("rollout_s", "ref_s", "train_s", "sync_s")}
    step_s = sum(parts.values())
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams

    n = args.group_size * args.prompts_per_step
    eng = Engine.from_folder(args.model, max_num_seqs=n, max_model_len=args.max_model_len, dtype=args.rollout_dtype,
                             quantize=None if args.rollout_quantize == "none" else args.rollout_quantize)
    prompt_len = sum(len(eng.encode_chat(it["prompt"])) for it in items) / len(items)
    in_grpo = sum(r["completion_len"] * n for r in recs) / sum(r["rollout_s"] for r in recs)
    out = {"framework": "lmforge", "s_per_step": step_s, "steps_per_s": 1 / step_s, "run_s_incl_load": total,
           "parts_s_per_step": parts, "completion_len": sum(r["completion_len"] for r in recs) / len(recs),
           "prompt_tokens": prompt_len, "rollout_tokens_per_s_in_grpo": in_grpo, "steps": steps}
    if args.no_standalone:
        return out
    # the same rollouts (prompts x G, same max_tokens and concurrency) on a standalone engine, for tokens/s
    stop = list(eng.chat_stop_token_ids)
    toks, secs = 0, 0.0
    for s in range(args.steps):
        batch = [eng.encode_chat(it["prompt"])
                 for it in items[s * args.prompts_per_step:(s + 1) * args.prompts_per_step]
                 for _ in range(args.group_size)]
        eng.reset_prefix_cache()
        t = time.time()
        res = eng.generate_batch(batch, [SamplingParams(max_tokens=args.max_tokens, seed=i, stop_token_ids=stop)
                                         for i in range(n)])
        secs += time.time() - t
        toks += sum(r.completion_tokens for r in res)
    return {**out, "engine_tokens_per_s_standalone": toks / secs}


def run_trl(args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    from lmforge.rl.rewards import Reward

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    items, reward_spec = task_items(args)
    data = Dataset.from_list([{"prompt": it["prompt"], "idx": i} for i, it in enumerate(items)])
    scorer = Reward.from_spec(reward_spec)  # the reward lmforge's run uses: the same Python functions

    def reward(prompts, completions, idx, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [scorer.score(items[i]["prompt"][-1]["content"], t,
                             {k: v for k, v in items[i].items() if k != "prompt"}).total for i, t in zip(idx, texts)]

    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    batch = args.group_size * args.prompts_per_step
    micro = args.trl_micro_batch or batch  # rows per forward + backward; the update is the same (dapo: over the batch)
    if batch % micro:
        raise SystemExit(f"--trl-micro-batch {micro} does not divide the {batch} completions of a step")
    cfg = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=micro, steps_per_generation=batch // micro,
                     num_generations=args.group_size, max_completion_length=args.max_tokens, learning_rate=args.lr,
                     beta=0.0, max_steps=args.steps, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                     save_strategy="no", temperature=1.0, top_p=1.0, top_k=0, gradient_accumulation_steps=batch // micro,
                     seed=0,
                     dataloader_num_workers=0, disable_tqdm=True, loss_type="dapo", num_iterations=1,
                     gradient_checkpointing=args.trl_gradient_checkpointing)
    logs: list[dict] = []
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.time()

        def on_step_end(self, *a, **k):
            step_times.append(time.time() - self.t)

        def on_log(self, _args, _state, _control, logs_=None, **k):
            logs.append(dict(k.get("logs") or logs_ or {}))

    spent: dict[str, list[float]] = {}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t = time.time()
            try:
                return fn(*a, **k)
            finally:  # one entry per step (each method runs once per step here)
                spent.setdefault(name, []).append(time.time() - t)
        return wrapper

    # where TRL's step goes: rollouts (generate), rewards, and the rest (log-prob forward, backward, optimiser)
    GRPOTrainer._generate = timed("rollout_s", GRPOTrainer._generate)
    GRPOTrainer._calculate_rewards = timed("reward_s", GRPOTrainer._calculate_rewards)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=data, processing_class=tok,
                          peft_config=peft_config, callbacks=[Timer()])
    t0 = time.time()
    trainer.train()
    total = time.time() - t0
    steps = [{"step_s": t, **{k: v[i] for k, v in spent.items()}} for i, t in enumerate(step_times)]
    for st in steps:
        st["train_s"] = st["step_s"] - sum(v for k, v in st.items() if k != "step_s")
    kept = steps[args.warmup:]
    prof = {k: sum(st[k] for st in kept) / len(kept) for k in (*spent, "train_s")}
    lens = [rec["completions/mean_length"] for rec in logs if "completions/mean_length" in rec]
    step_s = sum(st["step_s"] for st in kept) / len(kept)
    prompt_len = sum(len(tok.apply_chat_template(it["prompt"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]) for it in items) / len(items)
    return {"framework": "trl", "s_per_step": step_s, "steps_per_s": 1 / step_s, "run_s_incl_load": total,
            "parts_s_per_step": prof, "completion_len": sum(lens[args.warmup:]) / len(lens[args.warmup:]) if lens
            else None, "prompt_tokens": prompt_len, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--lora-r", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rollout-dtype", default="float32",
                    help="lmforge's rollout engine weights, float32 or bfloat16; a comma list runs lmforge once per "
                         "entry (each against the same TRL run; TRL's generate stays float32)")
    ap.add_argument("--rollout-quantize", default="none",
                    help="lmforge's rollout engine linear weights: none, int8 or int4 (truncated-IS corrected); a "
                         "comma list runs lmforge once per entry, against the same TRL run")
    ap.add_argument("--task", default="topics", help="topics (one-line prompts, token_fraction reward) or a built-in "
                                                     "RL task: arithmetic, countdown, json_format")
    ap.add_argument("--system-prompt", help="file whose text goes before every prompt as a system message")
    ap.add_argument("--max-model-len", type=int, default=512, help="lmforge's rollout engine context")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each process left out of the averages")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="keep TRL's default gradient checkpointing (lmforge has none; off by default here)")
    ap.add_argument("--trl-micro-batch", type=int, default=0,
                    help="TRL's rows per forward + backward (gradient accumulation over the step's completions, one "
                         "generation and one optimiser step per step as without it): bounds its activation memory "
                         "without recomputation; 0 = all of a step's completions at once")
    ap.add_argument("--no-standalone", action="store_true", help="skip the standalone-engine tokens/s measurement")
    ap.add_argument("--only", choices=["lmforge", "trl"])
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} must be more than --warmup {args.warmup} (warm-up steps are not averaged)")
    if args.only is None:  # each framework in its own process: no shared thread pools or caches
        print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        quants = args.rollout_quantize.split(",")
        bad = [q for q in quants if q not in ("none", "int8", "int4")]
        if bad:
            ap.error(f"--rollout-quantize: {bad[0]!r} is not none, int8 or int4")
        runs = [("lmforge", d, q) for d in args.rollout_dtype.split(",") for q in quants] + [("trl", "float32", "none")]
        results = []
        for fw, dtype, quant in runs:
            argv = [a for a in sys.argv[1:]]
            for flag in ("--rollout-dtype", "--rollout-quantize"):
                if flag in argv:
                    i = argv.index(flag)
                    del argv[i:i + 2]
            cmd = [sys.executable, __file__, *argv, "--rollout-dtype", dtype, "--rollout-quantize", quant, "--only", fw]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode != 0:
                print(f"{fw} failed:\n{out.stderr[-3000:]}")
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            if fw == "lmforge":
                res["framework"] = f"lmforge ({dtype} rollouts" + (f", {quant})" if quant != "none" else ")")
            results.append(res)
        print(f"uptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        for r in results:
            parts = ", ".join(f"{k.split('/')[-1]} {v:.3f}s" for k, v in r["parts_s_per_step"].items())
            print(f"{r['framework']:8s} {r['s_per_step']:.3f} s/step ({r['steps_per_s']:.3f} steps/s), prompt "
                  f"{r['prompt_tokens']:.1f} tokens, completion length {r['completion_len']}: {parts}")
            print(f"  per step: {json.dumps(r['steps'])}")
        for r in results:
            if "engine_tokens_per_s_standalone" in r:
                a, b = r["rollout_tokens_per_s_in_grpo"], r["engine_tokens_per_s_standalone"]
                print(f"{r['framework']} rollout tokens/s inside GRPO {a:.1f} vs the standalone engine at the same "
                      f"concurrency {b:.1f}: {100 * a / b:.0f}%")
        trl = [r for r in results if r["framework"] == "trl"]
        for r in results:
            if trl and r is not trl[0]:
                print(f"{r['framework']} / trl steps/s: {r['steps_per_s'] / trl[0]['steps_per_s']:.2f}x")
        return
    with tempfile.TemporaryDirectory() as tmp:
        res = (run_lmforge if args.only == "lmforge" else run_trl)(args, Path(tmp))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
