"""GRPO steps/s: lmforge (rollouts on its own engine, in process) vs TRL's GRPOTrainer (rollouts with
``transformers.generate``), side by side on the same model, prompts, reward, G, batch and fine-tuning mode.

    python bench/grpo_speed.py --model /tmp/tiny --steps 10                 # a tiny HF-layout Llama, full FT
    python bench/grpo_speed.py --model $(lmforge smollm2) --lora-r 16 --steps 5 --max-tokens 32

Needs ``pip install --no-deps trl`` (its dependencies transformers, accelerate, datasets are lmforge's).  Prints,
per framework, seconds per step and where the time goes: lmforge from its own per-step timings (rollout, reference
log-probs, train = forward + backward + optimiser, weight sync), TRL from timers around its methods.  The reward is ``token_fraction`` (share of the completion made of the letter "e"), KL off (beta 0) in both,
so both do the same work: rollouts, one policy forward + backward, an optimiser step.  TRL's split is measured by
timing its ``_generate`` and ``_calculate_rewards`` methods; ``train_s`` is the rest of its step.  The machine is shared: quote
``uptime`` with the figures.
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


def run_lmforge(args, work: Path) -> dict:
    from lmforge.rl import grpo

    task = work / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "token": "e"}) + "\n" for p in prompts(64)))
    mode = {"lora_r": args.lora_r} if args.lora_r else {"full": True}
    cfg = grpo.Config(model=args.model, task=str(task), reward="token_fraction", group_size=args.group_size,
                      prompts_per_step=args.prompts_per_step, max_steps=args.steps, max_tokens=args.max_tokens,
                      lr=args.lr, beta=0.0, test_size=0, eval_every=10**6, checkpoint_every=10**6, samples=0,
                      tensorboard=False, threads=args.threads, rollout_dtype=args.rollout_dtype,
                      rollout_quantize=args.rollout_quantize, **mode)
    t0 = time.time()
    grpo.run(cfg, work / "lmforge", force=True)
    total = time.time() - t0
    recs = [json.loads(l) for l in (work / "lmforge" / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    parts = {k: sum(r[k] for r in recs) / len(recs) for k in ("rollout_s", "ref_s", "train_s", "sync_s")}
    step_s = sum(parts.values())
    # the same rollouts (prompts x G, same max_tokens and concurrency) on a standalone engine, for tokens/s
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams

    n = args.group_size * args.prompts_per_step
    eng = Engine.from_folder(args.model, max_num_seqs=n, max_model_len=512, dtype=args.rollout_dtype,
                             quantize=None if args.rollout_quantize == "none" else args.rollout_quantize)
    stop = list(eng.chat_stop_token_ids)
    toks, secs = 0, 0.0
    for s in range(args.steps):
        batch = [eng.encode_chat([{"role": "user", "content": p}])
                 for p in prompts(64)[s * args.prompts_per_step:(s + 1) * args.prompts_per_step]
                 for _ in range(args.group_size)]
        eng.reset_prefix_cache()
        t = time.time()
        res = eng.generate_batch(batch, [SamplingParams(max_tokens=args.max_tokens, seed=i, stop_token_ids=stop)
                                         for i in range(n)])
        secs += time.time() - t
        toks += sum(r.completion_tokens for r in res)
    in_grpo = sum(r["completion_len"] * n for r in recs) / sum(r["rollout_s"] for r in recs)
    return {"framework": "lmforge", "s_per_step": step_s, "steps_per_s": 1 / step_s, "run_s_incl_load": total,
            "parts_s_per_step": parts, "completion_len": sum(r["completion_len"] for r in recs) / len(recs),
            "rollout_tokens_per_s_in_grpo": in_grpo, "engine_tokens_per_s_standalone": toks / secs}


def run_trl(args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts(64)])

    def reward(prompts, completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [t.count("e") / len(t) if t else 0.0 for t in texts]

    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    cfg = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.group_size * args.prompts_per_step,
                     num_generations=args.group_size, max_completion_length=args.max_tokens, learning_rate=args.lr,
                     beta=0.0, max_steps=args.steps, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                     save_strategy="no", temperature=1.0, gradient_accumulation_steps=1, seed=0,
                     dataloader_num_workers=0, disable_tqdm=True)
    logs: list[dict] = []
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.time()

        def on_step_end(self, *a, **k):
            step_times.append(time.time() - self.t)

        def on_log(self, _args, _state, _control, logs_=None, **k):
            logs.append(dict(k.get("logs") or logs_ or {}))

    spent: dict[str, float] = {}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t = time.time()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.time() - t
        return wrapper

    # where TRL's step goes: rollouts (generate), rewards, and the rest (log-prob forward, backward, optimiser)
    GRPOTrainer._generate = timed("rollout_s", GRPOTrainer._generate)
    GRPOTrainer._calculate_rewards = timed("reward_s", GRPOTrainer._calculate_rewards)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=data, processing_class=tok,
                          peft_config=peft_config, callbacks=[Timer()])
    t0 = time.time()
    trainer.train()
    total = time.time() - t0
    n = max(len(step_times), 1)
    prof = {k: v / n for k, v in spent.items()}
    prof["train_s"] = sum(step_times) / n - sum(prof.values())
    lens = [rec["completions/mean_length"] for rec in logs if "completions/mean_length" in rec]
    step_s = sum(step_times) / len(step_times)
    return {"framework": "trl", "s_per_step": step_s, "steps_per_s": 1 / step_s, "run_s_incl_load": total,
            "parts_s_per_step": prof, "completion_len": sum(lens) / len(lens) if lens else None}


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
    ap.add_argument("--rollout-quantize", choices=["none", "int8", "int4"], default="none")
    ap.add_argument("--only", choices=["lmforge", "trl"])
    args = ap.parse_args()
    if args.only is None:  # each framework in its own process: no shared thread pools or caches
        print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        runs = [("lmforge", d) for d in args.rollout_dtype.split(",")] + [("trl", "float32")]
        results = []
        for fw, dtype in runs:
            argv = [a for a in sys.argv[1:]]
            if "--rollout-dtype" in argv:
                i = argv.index("--rollout-dtype")
                del argv[i:i + 2]
            cmd = [sys.executable, __file__, *argv, "--rollout-dtype", dtype, "--only", fw]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode != 0:
                print(f"{fw} failed:\n{out.stderr[-3000:]}")
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            if fw == "lmforge":
                res["framework"] = f"lmforge ({dtype} rollouts" + \
                    (f", {args.rollout_quantize})" if args.rollout_quantize != "none" else ")")
            results.append(res)
        print(f"uptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        for r in results:
            parts = ", ".join(f"{k.split('/')[-1]} {v:.3f}s" for k, v in r["parts_s_per_step"].items())
            print(f"{r['framework']:8s} {r['s_per_step']:.3f} s/step ({r['steps_per_s']:.3f} steps/s), completion "
                  f"length {r['completion_len']}: {parts}")
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
