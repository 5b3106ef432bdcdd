"""`nextq run`: generate from a model with any backend, streaming text and reporting tokens/s (and, with
`--speculative mtp`, the draft acceptance); `--json` prints one JSON object instead."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from nextq.console import console
from nextq.errors import BackendError

from .generate import Sampling
from .speculative import MAX_DRAFT_TOKENS, METHODS, SpeculativeStats


def sampling_options(fn):
    """The sampling flags, mapped one-to-one onto `Sampling`."""
    for opt in reversed([
        click.option("--max-new-tokens", default=64, show_default=True, help="Tokens to generate."),
        click.option("--temperature", default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, help="Keep the k most likely tokens (0 = all)."),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass."),
        click.option("--repetition-penalty", default=1.0, show_default=True, help="CTRL-style penalty on seen tokens."),
        click.option("--presence-penalty", default=0.0, show_default=True, help="Subtracted from seen tokens' logits."),
        click.option("--seed", type=int, help="Sampling seed."),
    ]):
        fn = opt(fn)
    return fn


def run_generation(model_path: Path, prompt: str, *, backend=None, device="cpu", chat=False, max_new_tokens=64,
                   echo=True, speculative: str | None = None, draft_tokens: int = 2, **sampling) -> dict:
    """Load, generate (streaming to stdout when `echo`), and return the new ids, text and timing figures (plus
    `speculative`: draft_tokens, acceptance_rate, mean_accepted, ... when drafting with the MTP head)."""
    from nextq import load

    t0 = time.perf_counter()
    model = load(model_path, backend=backend, device=device)
    load_s = time.perf_counter() - t0
    if model.tokenizer is None:
        raise BackendError(f"{model_path}: no tokenizer files (tokenizer.json); cannot encode a text prompt")
    if chat:
        if model.tokenizer is None or not model.tokenizer.chat_template:
            raise click.UsageError(f"{model_path}: no chat template to apply (drop --chat)")
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
    if echo:
        click.echo(prompt, nl=False)
    spec = SpeculativeStats(draft_tokens) if speculative else None
    t1 = time.perf_counter()
    new = model.generate(prompt, max_new_tokens=max_new_tokens, sampling=Sampling(**sampling),
                         on_text=(lambda s: click.echo(s, nl=False)) if echo else None, speculative=speculative,
                         draft_tokens=draft_tokens, stats=spec)
    gen_s = time.perf_counter() - t1
    if echo:
        click.echo()
    n = int(np.asarray(new).shape[1])
    stats = {"backend": model.name, "load_s": load_s, "tokens": n, "seconds": gen_s, "tokens_per_s": n / gen_s,
             "ids": np.asarray(new)[0].tolist(), "text": model.tokenizer.decode(new[0], skip_special_tokens=True)}
    line = f"{model.name}: {n} tokens in {gen_s:.2f}s = {n / gen_s:.1f} tokens/s (load {load_s:.2f}s)"
    if spec is not None:
        stats["speculative"] = spec.as_dict()
        line += (f"; {speculative} k={draft_tokens}: acceptance {spec.acceptance_rate:.1%} "
                 f"({spec.accepted}/{spec.drafted}), {spec.mean_accepted:.2f} accepted per verify step")
    if echo:
        console.print(f"[dim]{line}[/]")
    return stats


@click.command("run")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--backend", help="Override the backend implied by MODEL (torch, transformers, ...).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--speculative", type=click.Choice(sorted(METHODS)),
              help="Speculative decoding: `mtp` drafts with the model's MTP head (torch, ort; gpu: greedy).")
@click.option("--draft-tokens", type=click.IntRange(1, MAX_DRAFT_TOKENS), default=2, show_default=True,
              help="Tokens the MTP head drafts per verify step (with --speculative).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (ids, text, tokens_per_s, speculative) instead of streaming.")
@sampling_options
def run_cmd(model, prompt, backend, device, chat, speculative, draft_tokens, as_json, max_new_tokens, **sampling):
    """Generate text from MODEL (IR directory, Hugging Face directory, ...), streaming tokens."""
    stats = run_generation(model, prompt, backend=backend, device=device, chat=chat, max_new_tokens=max_new_tokens,
                           echo=not as_json, speculative=speculative, draft_tokens=draft_tokens, **sampling)
    if as_json:
        click.echo(json.dumps(stats))
