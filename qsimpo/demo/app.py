"""The Gradio UI of `qsimpo demo`: the SFT model and the aligned model(s) side by side, one base in memory.

    qsimpo demo                                   # the quickstart's adapters/quickstart/adapter, offline, on a CPU
    qsimpo demo --adapter adapters/run [--base ID_OR_DIR] [--compare-adapter DIR_OR_HUB_ID]
    qsimpo demo --adapter adapters/simpo --adapter adapters/dpo [--votes-repo OWNER/NAME]   # SFT | simpo | dpo
    python -m qsimpo.demo [same flags]            # the same, without the console script

This module is the UI only. The model side (one PeftModel, every column, streaming, log-probs)
is sides.py beside it; votes become training rows in qsimpo.demo.votes.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no telemetry calls

import gradio as gr  # noqa: E402

from qsimpo.console import say
from qsimpo.errors import UsageError  # noqa: E402
from qsimpo.demo.votes import COMMIT_MINUTES, VOTES, VoteLog, default_votes_path, hub_votes, vote_row  # noqa: E402
from qsimpo.demo.sides import SIDES, Settings, SideBySide, resolve_adapter  # noqa: E402

# System fonts only: the default theme fetches Google Fonts, which an offline machine cannot reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# The chat's label ("SFT (adapter off)", "aligned: DIR") sits over the top of the message area: the messages
# start below it, so the first (the user's, right-aligned under a long label) is not drawn over it.
CSS = (".stats table { font-size: 0.85em; margin: 0; } .stats { min-height: 4.5em; } "
       ".qsimpo-chat .bubble-wrap { padding-top: 2.6em; }")


def _new_state(columns) -> dict:
    return {"history": {c: [] for c in columns}, "last": None, "voted": None}


def _view(history: list[dict], answer: str | None = None) -> list[dict]:
    shown = [m for m in history if m["role"] != "system"]
    return shown + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def stats_markdown(chat: SideBySide, stats: dict) -> str:
    """|y| and the average log-prob (and SimPO reward β·avg, when β is known) under each column's model."""
    names = [chat.sides[c].name for c in chat.columns]
    lp = [stats["avg_logprob"][c] for c in chat.columns]
    rows = [f"| **{stats['tokens']} tokens** | {' | '.join(f'under {n}' for n in names)} |", "|---" * (len(names) + 1) + "|",
            f"| avg log-prob | {' | '.join(f'{x:.3f}' for x in lp)} |"]
    if chat.beta:
        rows.append(f"| SimPO reward β·avg (β = {chat.beta:g}) | {' | '.join(f'{chat.beta * x:.2f}' for x in lp)} |")
    return "\n".join(rows)


def _header(chat: SideBySide) -> str:
    sides = chat.sides
    if chat.columns == SIDES:
        return (f"## qsimpo demo: {sides['left'].name} vs {sides['right'].name}\n{chat.description}. Left: "
                f"**{sides['left'].label}**. Right: **{sides['right'].label}**. One message goes to both; each side keeps "
                "its own history.")
    return (f"## qsimpo demo: {' vs '.join(sides[c].name for c in chat.columns)}\n{chat.description}. Columns: "
            f"{', '.join(f'**{sides[c].label}**' for c in chat.columns)}. One message goes to every column; each keeps "
            "its own history. A vote compares the two columns picked beside the buttons.")


def build_app(chat: SideBySide, votes) -> gr.Blocks:
    """The Blocks UI over ``chat``; votes are appended to ``votes`` (a file, or a VoteLog such as votes.hub_votes')."""
    log = votes if isinstance(votes, VoteLog) else VoteLog(votes)
    columns, pairwise = chat.columns, chat.columns == SIDES  # pairwise: the two columns are the vote's two sides
    max_new_limit = max(1, min(1024, chat.max_context // 2))

    def respond(message, system, temperature, top_p, max_new_tokens, seed, state):
        message = (message or "").strip()
        if not message:
            raise gr.Error("Type a message first.")
        settings = Settings(float(temperature), float(top_p), int(max_new_tokens), int(seed or 0), system or "")
        try:
            settings.check()
        except ValueError as e:
            raise gr.Error(str(e)) from None
        history = {c: state["history"][c] + [{"role": "user", "content": message}] for c in columns}
        context = {c: chat.context(history[c], settings) for c in columns}
        answers = {c: "" for c in columns}
        pending = {**state, "last": None, "voted": None}  # no voting on a half-finished turn

        def frame(stats=None, new_state=pending):
            stats = stats or {}
            return ("", *(_view(history[c], answers[c]) for c in columns), *(stats.get(c, "") for c in columns),
                    new_state, "")

        yield frame()
        for grown in chat.stream(context, settings):  # every column from one batched generation
            answers.update(grown)
            yield frame()
        stats = chat.stats(context, answers)
        turn = {c: {"model": chat.sides[c].label, "name": chat.sides[c].name, "loss": chat.sides[c].loss, "column": c,
                    "prompt": context[c], "response": answers[c], **stats[c]} for c in columns}
        turn["settings"] = settings.to_dict()
        done = {"history": {c: history[c] + [{"role": "assistant", "content": answers[c]}] for c in columns},
                "last": turn, "voted": None}
        yield frame({c: stats_markdown(chat, stats[c]) for c in columns}, done)

    def make_vote(choice: str):
        def vote(state, left=SIDES[0], right=SIDES[1]):
            if state["last"] is None:
                return "Nothing to vote on yet: send a message and wait for the answers.", state
            if state["voted"]:
                return f"This turn already has a vote ({VOTES[state['voted']]}); send another message.", state
            if left == right or left not in columns or right not in columns:
                return "Pick two different columns to compare.", state
            try:
                row = vote_row(choice, {"left": state["last"][left], "right": state["last"][right],
                                        "settings": state["last"]["settings"]})
            except ValueError as e:
                return f"Not recorded: {e}.", state
            log.append(row)
            counts = log.count()
            tally = ", ".join(f"{VOTES[k]} {n}" for k, n in counts.items())
            trainable = counts["left"] + counts["right"]
            compared = "" if pairwise else f" ({chat.sides[left].name} vs {chat.sides[right].name})"
            hub = f", committed to the Hub dataset {log.repo_id}" if log.repo_id else ""
            return (f"Recorded **{VOTES[choice]}**{compared} in `{log.path}`{hub} ({tally}; {trainable} trainable pairs: "
                    f"`qsimpo train CONFIG --data.path {log.repo_id or log.path}`)."), {**state, "voted": choice}
        vote.__name__ = f"vote_{choice}"
        return vote

    def clear():
        return ("", *([] for _ in columns), *("" for _ in columns), _new_state(columns), "")

    with gr.Blocks(title="qsimpo demo", analytics_enabled=False) as demo:
        gr.Markdown(_header(chat))
        state = gr.State(_new_state(columns))
        with gr.Row(equal_height=True):
            bots, stats = {}, {}
            for c in columns:
                with gr.Column():
                    bots[c] = gr.Chatbot(label=chat.sides[c].label, height=300, elem_id=f"chat-{c}",
                                         elem_classes=["qsimpo-chat"], feedback_options=None, buttons=[],
                                         placeholder=f"{chat.sides[c].name} answers here")
                    stats[c] = gr.Markdown(elem_id=f"stats-{c}", elem_classes=["stats"])
        with gr.Row():
            message = gr.Textbox(placeholder="Message every model and press Enter", show_label=False, scale=5,
                                 elem_id="message", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            clear_btn = gr.Button("Clear", scale=1, elem_id="clear")
        with gr.Row():
            picks = []
            if not pairwise:  # several columns: the vote's left and right are two of them, picked here
                choices = [(chat.sides[c].label, c) for c in columns]
                picks = [gr.Dropdown(choices, value=columns[i], label=f"vote: {side}", elem_id=f"vote-{side}-column",
                                     scale=2) for i, side in enumerate(SIDES)]
            buttons = {choice: gr.Button(label, size="md", elem_id=f"vote-{choice.replace('_', '-')}")
                       for choice, label in VOTES.items()}
        status = gr.Markdown(elem_id="vote-status")
        with gr.Accordion("Generation settings (the same for every column)", open=False, elem_id="settings"):
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature (0: greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="top-p", elem_id="top-p")
                max_new = gr.Slider(1, max_new_limit, value=min(96, max_new_limit), step=1, label="max new tokens", elem_id="max-new-tokens")
                seed = gr.Number(0, precision=0, label="seed (every column)", elem_id="seed")
            system = gr.Textbox(chat.system_prompt or "", label="system prompt", lines=2, visible=chat.takes_system,
                                placeholder="prepended to every conversation as a system message", elem_id="system-prompt")

        inputs = [message, system, temperature, top_p, max_new, seed, state]
        outputs = [message, *(bots[c] for c in columns), *(stats[c] for c in columns), state, status]
        # Several users' messages run at once: the batcher generates whatever is waiting together, up to
        # its batch size; more wait in gradio's queue, which tells each user their place.
        users = max(1, chat.batcher.max_rows // len(columns))
        send.click(respond, inputs, outputs, api_name="send", concurrency_id="model", concurrency_limit=users)
        message.submit(respond, inputs, outputs, api_name="send_enter", api_visibility="undocumented",
                       concurrency_id="model", concurrency_limit=users)
        for choice, button in buttons.items():
            button.click(make_vote(choice), [state, *picks], [status, state], api_name=f"vote_{choice}")
        clear_btn.click(clear, None, outputs, api_name="clear")
        for bot in bots.values():  # a column's own trash icon clears all: the histories stay one conversation
            bot.clear(clear, None, outputs, api_visibility="undocumented")
    demo.votes_path = log.path
    demo.votes_log = log
    return demo


def launch_demo(adapter: list[str] | None = None, base: str | None = None, compare_adapter: str | None = None,
                votes: str | None = None, votes_repo: str | None = None, host: str = "127.0.0.1", port: int | None = None,
                share: bool = False, trust_remote_code: bool = False, block: bool = True):
    """Load the model once, build the UI and serve it; returns the Blocks (after the server stops, if ``block``).
    ``adapter``: one adapter (SFT | aligned) or several (SFT | one column each)."""
    adapters = [adapter] if isinstance(adapter, str) else list(adapter or [])
    first, base = resolve_adapter(adapters[0] if adapters else None, base)
    adapters = adapters or [first]
    chat = SideBySide.load(adapters, base, compare_adapter, trust_remote_code=trust_remote_code)
    path = Path(votes) if votes else default_votes_path(first)
    demo = build_app(chat, hub_votes(votes_repo, path.parent) if votes_repo else path)
    where = f" and committed to the Hub dataset {votes_repo} every {COMMIT_MINUTES:g} minutes" if votes_repo else ""
    say(f"votes are appended to {demo.votes_path}{where}")
    try:
        # quiet: gradio's own hint for a public link is `share=True` in code; a qsimpo user passes --share
        demo.queue().launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                            theme=THEME, css=CSS, footer_links=["api"], ssr_mode=False, show_error=True)
    except OSError as e:
        if port is None or "Cannot find empty port" not in str(e):
            raise
        raise UsageError(f"port {port} on {host} is in use: pass another --port, or leave it out to take the first "
                         "free one from 7860") from None
    say(f"* Running on local URL:  {demo.local_url}")
    if not demo.share_url:  # with --share, gradio prints the public URL itself
        say("* a temporary public link (for others to try it): qsimpo demo --share")
    if block:
        demo.block_thread()
    return demo

