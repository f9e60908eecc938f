"""Commands that run a model: plan, run, chat, serve, rpc-server, each placed by the planner
and driven through our llama-server."""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path

import click

from ..core.errors import StepGGUFError
from ..core.units import human_size
from ..plan import MAX_SLOTS, SLOT_CTX
from .foreground import hold_until_stopped, paused
from .planning import (draft_max_option, draft_option, drafting, expert_cache_option, machine_options,
                       mmproj_options, model_options, planned, profile_machine, profiles_help, prompt_cache_option,
                       rpc_hosts, rpc_option, seeing, with_draft_max)

PLAN_CTX = 32768  # what `plan` prices without --ctx


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", required=True, metavar="NAME",
              help="The machine. " + profiles_help() + ".")
@click.option("-c", "--ctx", type=click.IntRange(1), default=None,
              help=f"Context length in tokens [{PLAN_CTX}, or what a file made with quantize --for "
                   "was sized for on this profile].")
@click.option("--scheme", default=None,
              help="For a checkpoint or config.json: the quantization scheme to price "
                   "[int4-mixed]. A GGUF is planned as it is.")
@click.option("--kv-type", default=None, help="KV cache type (f16, q8_0, q4_0, ...) [chosen].")
@click.option("--parallel", type=click.IntRange(1), default=1, show_default=True,
              help="Sequences llama-server decodes at once (its -np).")
@click.option("--no-mtp", is_flag=True, help="Plan without the MTP draft heads.")
@draft_option
@draft_max_option
@machine_options
@rpc_option
@expert_cache_option
@prompt_cache_option
@mmproj_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model: Path, profile: str, ctx: int, scheme: str | None, kv_type: str | None,
         parallel: int, no_mtp: bool, draft: Path | None, draft_max: int | None, figures: dict,
         rpc: str | None, expert_cache, prompt_cache: int | None, mmproj: Path | None, as_json: bool) -> None:
    """Where MODEL's tensors go on a machine, what the KV cache and buffers take, the
    predicted prompt and decode speed, and the llama-server command that runs it so.

    MODEL is a GGUF, a checkpoint folder or a bare config.json (priced under --scheme, so the
    real 196B model can be planned without its weights). Everything that runs for every token
    goes on the GPU first, MTP heads included; then as many routed experts as fit. With
    --rpc, RPC hosts take whole layers, only those this machine cannot hold.
    """
    import json

    from .. import plan as planner
    from ..pipeline.source_facts import read_facts

    machine = profile_machine(profile, figures)
    draft = drafting(model, draft, not no_mtp, say=not as_json)
    facts = read_facts(model, scheme, draft, seeing(model, mmproj, say=not as_json))
    made = planner.sized_for(facts.made_for, machine)
    p = planner.plan(facts, machine, ctx or (made.ctx if made is not None else PLAN_CTX), kv_type=kv_type,
                     mtp=not no_mtp, parallel=parallel, rpc=rpc_hosts(rpc, machine),
                     expert_cache=expert_cache, prompt_cache=prompt_cache)
    p = with_draft_max(p, draft_max, no_mtp)
    # a config or checkpoint is planned as the GGUF it would become; a split GGUF is loaded from
    # its first shard, whichever shard was named
    from ..files.gguf_source import first_shard

    target = str(first_shard(model)) if model.is_file() and model.suffix == ".gguf" else "MODEL.gguf"
    if as_json:
        click.echo(json.dumps(p.to_json(target), indent=1))
        return
    click.echo(f"{p.model.name} on {machine.name} ({machine.what}), ctx {p.ctx}, KV {p.kv_type}, "
               f"batch {p.n_batch}/{p.n_ubatch}, MTP {'off' if not p.mtp else f'on, drafting {p.draft_max} a round' if p.draft_max else 'on, adaptive draft length'}"
               + (f" (heads from {Path(p.model.draft).name})" if p.mtp and p.model.draft else ""))
    classes = p.classes()
    kinds = sorted({k for per in classes.values() for k in per})
    for d in p.devices:
        if d.endpoint:
            click.echo(f"{d.name} is the RPC host {d.endpoint}")
    click.echo(f"{'':<22}" + "".join(f"{d.name:>12}" for d in p.devices))
    for k in kinds:
        click.echo(f"{k:<22}" + "".join(f"{human_size(classes[d.name].get(k, 0)):>12}" for d in p.devices))
    for k in sorted({k for d in p.devices for k in d.extra}):
        click.echo(f"{k:<22}" + "".join(f"{human_size(d.extra.get(k, 0)):>12}" for d in p.devices))
    click.echo(f"{'total / usable':<22}" + "".join(
        f"{human_size(d.bytes) + ' / ' + human_size(d.capacity):>24}" for d in p.devices))
    click.echo(f"prompt cache: up to {human_size(p.prompt_cache_mib * 2**20)} of what is left in system memory "
               "(--cache-ram; earlier prompts' state, for requests that come back to them)")
    click.echo(f"predicted: prompt {p.predicted_prompt_tps:.0f} tok/s, decode "
               f"{p.predicted_decode_tps:.1f} tok/s ({p.predicted_decode_tps_full:.1f} at a full "
               f"context), without MTP drafting")
    for note in p.notes:
        click.echo(f"note: {note}")
    if machine.backend:
        click.echo(f"runtime: the {machine.backend} build (step-gguf runtime build --backend "
                   f"{machine.backend})")
    env = "".join(f"{k}={v} " for k, v in p.server_env().items())
    click.echo(env + "llama-server " + shlex.join(p.server_args(target)))


def _stream(kind: str, text: str) -> None:
    # reasoning goes to stderr, dimmed, so that stdout holds the answer alone
    if kind == "reasoning":
        click.secho(text, nl=False, err=True, dim=True)
    else:
        click.echo(text, nl=False)


@click.command()
@model_options
@click.option("-p", "--prompt", default="Hello! Who are you?", show_default=True,
              help="User message, sent through the GGUF's chat template.")
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=256, show_default=True,
              help="Most tokens to generate (reasoning included).")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="An image the prompt is about (Step 3.7 with its mmproj; repeat for more).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for the server's sampler (answers are greedy: temperature 0).")
@click.option("--json", "as_json", is_flag=True,
              help="Print text, reasoning, tool calls, token counts, tok/s and MTP acceptance as JSON.")
def run(model: Path, ctx: int | None, profile: str | None, no_mtp: bool, draft: Path | None,
        draft_max: int | None, rpc: str | None, expert_cache, prompt_cache: int | None, mmproj: Path | None,
        figures: dict, prompt: str, max_tokens: int, images: tuple[Path, ...], seed: int, as_json: bool) -> None:
    """Answer one PROMPT with the GGUF MODEL, placed by the plan for your machine, drafting
    with its MTP heads. The answer streams to stdout, the reasoning to stderr."""
    import json

    from ..runtime import server
    from ..runtime.images import user_message

    message = user_message(prompt, images)  # a missing image is said before anything loads

    p = planned(model, profile, ctx, not no_mtp, rpc, draft, say=not as_json, draft_max=draft_max,
                 figures=figures, expert_cache=expert_cache, prompt_cache=prompt_cache, mmproj=mmproj)
    if images and p.model.vision is None:
        raise StepGGUFError(f"--image needs {model.name}'s vision tower: convert a Step 3.7 checkpoint "
                            "with --mmproj, and give that file with --mmproj FILE or put it beside the model")
    with server.running(model, plan=p) as r:
        reply = server.chat(r.url, [message], max_tokens=max_tokens,
                            seed=seed, on_text=None if as_json else _stream)
        cache = r.expert_cache() if p.expert_cache else None
    if as_json:
        click.echo(json.dumps(reply.to_json() | {"mtp_enabled": p.mtp,
                                                 "mtp_draft": p.model.draft if p.mtp else None,
                                                 "mtp_draft_max": p.draft_length, "expert_cache": cache},
                              indent=1))
        return
    click.echo("")
    accepted = f", MTP acceptance {reply.acceptance:.0%}" if reply.acceptance is not None else ""
    if p.mtp and reply.draft_rounds:
        accepted += ", rounds by draft length " + " ".join(
            f"{k}:{n}" for k, n in enumerate(reply.draft_rounds) if n)
    if cache:
        accepted += (f", expert cache {cache['hits']}/{cache['routed']} hits, "
                     f"{human_size(cache['bytes_copied'])} copied in {cache['copy_seconds']:.2f} s")
    click.echo(f"[{reply.prompt_tokens} prompt tokens at {reply.prompt_tps:.1f} tok/s, "
               f"{reply.completion_tokens} generated at {reply.decode_tps:.1f} tok/s{accepted}]",
               err=True)


@click.command()
@model_options
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=1024, show_default=True,
              help="Most tokens to generate per answer (reasoning included).")
@click.option("--system", default=None, help="System message.")
def chat(model: Path, ctx: int | None, profile: str | None, no_mtp: bool, draft: Path | None,
         draft_max: int | None, rpc: str | None, expert_cache, prompt_cache: int | None, mmproj: Path | None,
         figures: dict, max_tokens: int, system: str | None) -> None:
    """Talk with the GGUF MODEL in the terminal (end with Ctrl-D or /exit)."""
    from ..runtime import server

    p = planned(model, profile, ctx, not no_mtp, rpc, draft, draft_max=draft_max, figures=figures,
                 expert_cache=expert_cache, prompt_cache=prompt_cache, mmproj=mmproj)
    messages = [{"role": "system", "content": system}] if system else []
    with server.serve(model, plan=p) as url:
        while True:
            try:
                line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
            except (EOFError, click.Abort):
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            reply = server.chat(url, messages, max_tokens=max_tokens, on_text=_stream)
            click.echo("")
            messages.append({"role": "assistant", "content": reply.text})


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="Port to listen on (llama-server's own default).")
@click.option("--api-key", default=None, help="Key clients must send (Authorization: Bearer).")
@click.option("-np", "--parallel", type=click.IntRange(1), default=None,
              help="Slots: requests served at once, each with its own --ctx [as many as fit, up "
                   f"to {MAX_SLOTS}, while each keeps {SLOT_CTX // 1024}K tokens].")
def serve(model: Path, ctx: int | None, profile: str | None, no_mtp: bool, draft: Path | None,
          draft_max: int | None, rpc: str | None, expert_cache, prompt_cache: int | None, mmproj: Path | None,
          figures: dict, host: str, port: int, api_key: str | None, parallel: int | None) -> None:
    """Serve MODEL with an OpenAI-compatible API (our llama-server, with the plan's placement,
    MTP drafting, the GGUF's chat template, reasoning and tool-call parsing) until Ctrl-C."""
    from ..native import page
    from ..runtime import server

    server.check_exposure(host, api_key)  # before planning: one line, nothing else said

    @contextlib.contextmanager
    def kept_up():
        with server.running(model, plan=planned(model, profile, ctx, not no_mtp, rpc, draft,
                                                 parallel=parallel, draft_max=draft_max,
                                                 figures=figures, expert_cache=expert_cache,
                                                 prompt_cache=prompt_cache, mmproj=mmproj),
                            host=host, port=port, api_key=api_key) as r:
            click.echo(f"llama-server log: {r.process.log_path}", err=True)
            click.echo(f"chat page: {r.url}/" if server.has_page(r.url) else f"no chat page: {page.NO_PAGE}",
                       err=True)
            yield f"{r.url}/v1", lambda: r.process.keep_up(on_event=lambda line: click.echo(line, err=True))

    hold_until_stopped(kept_up(), f"serving {model.name} at {{}} (OpenAI-compatible); if llama-server "
                                   "dies it is restarted; Ctrl-C stops")


@click.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. ggml's RPC protocol has no authentication: bind a LAN "
                   "address only on a network you trust.")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True,
              help="Port to listen on (ggml-rpc-server's own default).")
@click.option("-t", "--threads", type=click.IntRange(1), default=None, help="CPU threads [all cores].")
def rpc_server(host: str, port: int, threads: int | None) -> None:
    """Lend this machine's memory to another's `step-gguf run/serve --rpc HOST:PORT`: runs
    our ggml-rpc-server (same build, same protocol) until Ctrl-C."""
    from ..runtime import rpc, server

    if host not in server.LOOPBACK:
        click.echo(f"warning: {host}:{port} accepts unauthenticated RPC from anyone who can "
                   "reach it", err=True)
    hold_until_stopped(paused(rpc.start(port, host, threads)),
                        "ggml RPC host at {0}; use --rpc {0} on the machine that runs the model; "
                        "Ctrl-C stops")
