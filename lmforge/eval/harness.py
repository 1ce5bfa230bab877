"""Scoring a model on tasks: log-likelihoods of continuations, rolling bits-per-byte, greedy generation with stops.

``LM`` wraps one of our ``Llama`` models with its ``tokenizers.Tokenizer``.  Requests follow lm-evaluation-harness's
conventions so both tools give the same numbers on the same model folder:

* a continuation's log-likelihood is ``log p(continuation | context)`` where trailing spaces of the context move onto
  the continuation, ``context + continuation`` is encoded as a whole and the continuation's tokens are the ones after
  the context's own encoding; an empty context is preceded by the end-of-text token; over-long inputs keep their last
  ``max_len`` tokens;
* multiple choice scores ``context + target_delimiter + choice`` for each choice.

``run_task`` turns a task into per-item records and its metrics with bootstrap confidence intervals;
``aggregate`` averages centred scores across tasks.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import torch
import torch.nn.functional as F

from lmforge.eval import metrics as M
from lmforge.eval.tasks import Task
from lmforge.model.hf import load_model
from lmforge.model.llama import KVCache, Llama
from lmforge.progress import console
from lmforge.tokenizer.bpe import EOS, load_tokenizer


class LM:
    """A model + tokenizer with the three request types evaluation needs."""

    def __init__(self, model: Llama, tokenizer, tokenizer_config: dict, batch_tokens: int = 4096,
                 max_len: int | None = None) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.tok_cfg = tokenizer_config
        self.batch_tokens = batch_tokens
        self.max_len = min(max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.truncated = 0  # requests cut to their last max_len tokens (``run_task`` reports them per task)
        eos = tokenizer_config.get("eos_token") or EOS
        eos = eos["content"] if isinstance(eos, dict) else eos
        self.eos_id = tokenizer.token_to_id(eos)
        if self.eos_id is None:
            raise ValueError(f"the tokenizer has no end-of-text token {eos!r}")

    @classmethod
    def from_folder(cls, folder: str | Path, batch_tokens: int = 4096, max_len: int | None = None) -> "LM":
        tok, cfg = load_tokenizer(folder)
        return cls(load_model(folder), tok, cfg, batch_tokens=batch_tokens, max_len=max_len)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    # -- log-likelihood --------------------------------------------------------------------------------------------
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.eos_id], self.encode(continuation)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        """``log p(continuation | context)`` (nats) for each ``(context, continuation)``."""
        encoded = []
        for ctx, cont in requests:
            c, k = self._split(ctx, cont)
            if not k:
                raise ValueError(f"empty continuation for context {ctx[-40:]!r}")
            self.truncated += len(c) + len(k) > self.max_len + 1
            ids = (c + k)[-(self.max_len + 1):]  # too long: keep the last max_len + 1 tokens
            encoded.append((ids[:-1], ids[-min(len(k), len(ids) - 1):]))
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        out = [0.0] * len(encoded)
        start = 0
        while start < len(order):
            width = len(encoded[order[start]][0])
            n = max(1, self.batch_tokens // max(1, width))
            batch = order[start:start + n]
            x = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                inp = encoded[i][0]
                x[row, :len(inp)] = torch.tensor(inp)
            logits = self.model(x)
            for row, i in enumerate(batch):
                inp, cont = encoded[i]
                pos = torch.arange(len(inp) - len(cont), len(inp))
                logp = F.log_softmax(logits[row, pos].float(), dim=-1)
                out[i] = float(logp.gather(1, torch.tensor(cont)[:, None]).sum())
            start += n
        return out

    @torch.no_grad()
    def rolling_nll(self, text: str) -> tuple[float, int]:
        """Summed NLL (nats) of every token of ``text`` (first one conditioned on end-of-text), in disjoint windows
        of ``max_len`` predictions; returns ``(nll, n_tokens)``."""
        ids = [self.eos_id] + self.encode(text)
        nll, n = 0.0, 0
        for s in range(0, len(ids) - 1, self.max_len):
            chunk = ids[s:s + self.max_len + 1]
            x, y = torch.tensor([chunk[:-1]]), torch.tensor(chunk[1:])
            logits = self.model(x)[0].float()
            nll += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
        return nll, n

    # -- generation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int, stop: list[str]) -> str:
        """Greedy continuation of ``prompt``, cut at the first stop sequence (or the end-of-text token)."""
        ids = self.encode(prompt)
        self.truncated += len(ids) > self.max_len - 1
        ids = ids[-(self.max_len - 1):] or [self.eos_id]
        max_new_tokens = max(0, min(max_new_tokens, self.max_len - len(ids)))
        dtype = next(self.model.parameters()).dtype
        cache = KVCache.allocate(self.model.config, 1, len(ids) + max_new_tokens, dtype=dtype)
        x, pos, new = torch.tensor([ids]), 0, []
        text = ""
        for _ in range(max_new_tokens):
            positions = torch.arange(pos, pos + x.shape[1])[None]
            logits = self.model(x, positions=positions, cache=cache, last_only=True)[0, -1]
            pos += x.shape[1]
            nxt = int(torch.argmax(logits))
            if nxt == self.eos_id:
                break
            new.append(nxt)
            text = self.tok.decode(new, skip_special_tokens=False)
            if any(s in text for s in stop):
                break
            x = torch.tensor([[nxt]])
        cut = min([text.index(s) for s in stop if s in text], default=len(text))
        return text[:cut]

    # -- chat ------------------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Render messages with the tokenizer's chat template, ending with the assistant's turn opened."""
        template = self.tok_cfg.get("chat_template")
        if not template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; set chat: false on the task")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str) -> None:
            raise jinja2.exceptions.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in self.tok_cfg.items()
                   if k in ("bos_token", "eos_token")}
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)


# ----------------------------------------------------------------------------------------------------------------------
# tasks


def _context(lm: LM, task: Task, index: int) -> str:
    """The full context for item ``index``: few-shot examples + the item's prompt (as chat when the task says so)."""
    spec, item = task.spec, task.items[index]
    shots = task.fewshot(index)
    if spec.chat:
        messages: list[dict[str, str]] = []
        for ex in shots:
            messages += [{"role": "user", "content": task.render(ex)},
                         {"role": "assistant", "content": task.answers(ex)[0]}]
        messages.append({"role": "user", "content": task.render(item)})
        return lm.chat_prompt(messages)
    parts = [task.render(ex) + spec.target_delimiter + task.answers(ex)[0] for ex in shots]
    return spec.fewshot_delimiter.join(parts + [task.render(item)])


def _mc(lm: LM, task: Task) -> tuple[list[dict], dict[str, Any]]:
    spec = task.spec
    requests, spans = [], []
    for i, item in enumerate(task.items):
        ctx = _context(lm, task, i)
        delim = "" if spec.chat else spec.target_delimiter
        choices = task.choices(item)
        spans.append((len(requests), len(choices)))
        requests += [(ctx, delim + c) for c in choices]
    lls = lm.loglikelihood(requests)
    records, acc, acc_norm, chance = [], [], [], []
    for item, (s, n) in zip(task.items, spans):
        choices, gold = task.choices(item), item[spec.answer_field]
        raw, norm = M.mc_scores(lls[s:s + n], choices)
        acc.append(M.mc_correct(raw, gold))
        acc_norm.append(M.mc_correct(norm, gold))
        chance.append(1.0 / n)
        records.append({"loglikelihoods": [round(v, 4) for v in raw], "gold": gold, "acc": acc[-1],
                        "acc_norm": acc_norm[-1]})
    per_item = {"acc": acc, "acc_norm": acc_norm}
    out: dict[str, Any] = {"chance": sum(chance) / len(chance)}
    for name, values in per_item.items():
        out[name] = sum(values) / len(values)
        out[f"{name}_ci"] = M.bootstrap_ci(values)
    return records, out


def _gen(lm: LM, task: Task) -> tuple[list[dict], dict[str, Any]]:
    spec = task.spec
    records, per_item = [], {m: [] for m in M.GENERATION_METRICS} if not spec.reward else {}
    reward = None
    for i, item in enumerate(task.items):
        ctx = _context(lm, task, i)
        if not spec.chat:
            ctx += spec.target_delimiter.rstrip(" ")  # "Answer:" + " " would leave a dangling space token
        pred = lm.generate(ctx, spec.max_new_tokens, spec.stop).strip()
        if spec.reward:  # a verifiable task: the reward over the item's fields is the score
            if reward is None:
                from lmforge.rl.rewards import Reward

                reward = Reward.from_spec(spec.reward)
            scored = reward.score(task.render(item), pred, item)
            records.append({"prediction": pred, "reward": scored.total, "parts": scored.parts})
            per_item.setdefault("reward", []).append(scored.total)
            continue
        refs = task.answers(item)
        rec: dict[str, Any] = {"prediction": pred, "references": refs}
        for m, fn in M.GENERATION_METRICS.items():
            rec[m] = fn(pred, refs)
            per_item[m].append(rec[m])
        records.append(rec)
    out: dict[str, Any] = {"chance": 0.0}
    for name, values in per_item.items():
        out[name] = sum(values) / len(values)
        out[f"{name}_ci"] = M.bootstrap_ci(values)
    return records, out


def _ppl(lm: LM, task: Task) -> tuple[list[dict], dict[str, Any]]:
    field = task.spec.text_field
    records, nlls, nbytes, ntoks = [], [], [], []
    for item in task.items:
        text = item[field]
        nll, n = lm.rolling_nll(text)
        b = len(text.encode("utf-8"))
        nlls.append(nll / math.log(2))
        nbytes.append(b)
        ntoks.append(n)
        records.append({"nll_nats": round(nll, 3), "tokens": n, "bytes": b, "bpb": round(M.bits_per_byte(nll, b), 4)})
    bpb = sum(nlls) / sum(nbytes)
    return records, {"bpb": bpb, "bpb_ci": M.bootstrap_ratio_ci(nlls, nbytes),
                     "token_ppl": math.exp(min(50.0, sum(nlls) * math.log(2) / sum(ntoks))),
                     "bytes": sum(nbytes), "tokens": sum(ntoks)}


def run_task(lm: LM, task: Task) -> dict[str, Any]:
    """Score every item of ``task``; returns ``{name, type, metric, score, ci, n, chance, centered, ..., items}``."""
    t0 = time.time()
    fn = {"multiple_choice": _mc, "generation": _gen, "perplexity": _ppl}[task.spec.type]
    truncated_before = lm.truncated
    records, out = fn(lm, task)
    truncated = lm.truncated - truncated_before
    metric = task.spec.metric
    result: dict[str, Any] = {"name": task.name, "type": task.spec.type, "metric": metric, "score": out[metric],
                              "ci": list(out[f"{metric}_ci"]), "n": len(task.items), "num_fewshot": task.spec.num_fewshot,
                              "chat": task.spec.chat, "task_file": str(task.path), "truncated_requests": truncated}
    if task.spec.type != "perplexity":
        result["centered"] = M.centered(out[metric], out["chance"])
    result.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()})
    result["seconds"] = round(time.time() - t0, 2)
    result["items"] = records
    if truncated:
        console.print(f"[yellow]  {task.name}: {truncated} request(s) longer than the {lm.max_len}-token context were "
                      f"cut to their last tokens (raise task_max_len / --task-max-len up to the model's context)[/]")
    ci = result["ci"]
    console.print(f"  {task.name}: {metric} {result['score']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] "
                  f"(n={result['n']}, {result['seconds']}s)")
    return result


def aggregate(results: list[dict[str, Any]]) -> float | None:
    """Mean centred score over the tasks that have one (perplexity tasks, lower-is-better, are left out)."""
    scores = [r["centered"] for r in results if "centered" in r]
    return sum(scores) / len(scores) if scores else None
