"""The Gradio UI of `qsimpo demo`: the SFT model and the aligned model side by side, one base in memory.

    qsimpo demo                                   # the quickstart's adapters/quickstart/adapter, offline, on a CPU
    qsimpo demo --adapter adapters/run [--base ID_OR_DIR] [--compare-adapter DIR_OR_HUB_ID]
    python -m qsimpo.demo [same flags]            # the same, without the console script

This module is the UI only. The model side (one PeftModel, both columns, streaming, log-probs)
is sides.py beside it; votes become training rows in qsimpo.demo.votes.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no telemetry calls

import gradio as gr  # noqa: E402

from qsimpo.errors import UsageError  # noqa: E402
from qsimpo.demo.votes import VOTES, VoteLog, default_votes_path, vote_row  # noqa: E402
from qsimpo.demo.sides import SIDES, Settings, SideBySide, resolve_adapter  # noqa: E402

# System fonts only: the default theme fetches Google Fonts, which an offline machine cannot reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# The chat's label ("SFT (adapter off)", "aligned: DIR") sits over the top of the message area: the messages
# start below it, so the first (the user's, right-aligned under a long label) is not drawn over it.
CSS = (".stats table { font-size: 0.85em; margin: 0; } .stats { min-height: 4.5em; } "
       "#chat-left .bubble-wrap, #chat-right .bubble-wrap { padding-top: 2.6em; }")


def _new_state() -> dict:
    return {"history": {side: [] for side in SIDES}, "last": None, "voted": None}


def _view(history: list[dict], answer: str | None = None) -> list[dict]:
    shown = [m for m in history if m["role"] != "system"]
    return shown + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def stats_markdown(chat: SideBySide, stats: dict) -> str:
    """|y| and the average log-prob (and SimPO reward β·avg, when β is known) under each side's model."""
    names = [chat.sides[s].name for s in SIDES]
    lp = [stats["avg_logprob"][s] for s in SIDES]
    rows = [f"| **{stats['tokens']} tokens** | {' | '.join(f'under {n}' for n in names)} |", "|---|---|---|",
            f"| avg log-prob | {' | '.join(f'{x:.3f}' for x in lp)} |"]
    if chat.beta:
        rows.append(f"| SimPO reward β·avg (β = {chat.beta:g}) | {' | '.join(f'{chat.beta * x:.2f}' for x in lp)} |")
    return "\n".join(rows)


def build_app(chat: SideBySide, votes_path) -> gr.Blocks:
    """The Blocks UI over ``chat``; votes are appended to ``votes_path``."""
    log = VoteLog(votes_path)
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
        history = {s: state["history"][s] + [{"role": "user", "content": message}] for s in SIDES}
        context = {s: chat.context(history[s], settings) for s in SIDES}
        answers = {s: "" for s in SIDES}
        pending = {**state, "last": None, "voted": None}  # no voting on a half-finished turn

        def frame(left_stats="", right_stats="", new_state=pending):
            return "", _view(history["left"], answers["left"]), _view(history["right"], answers["right"]), \
                left_stats, right_stats, new_state, ""

        yield frame()
        for grown in chat.stream(context, settings):  # both columns from one batched generation
            answers.update(grown)
            yield frame()
        stats = chat.stats(context, answers)
        turn = {s: {"model": chat.sides[s].label, "prompt": context[s], "response": answers[s], **stats[s]} for s in SIDES}
        turn["settings"] = settings.to_dict()
        done = {"history": {s: history[s] + [{"role": "assistant", "content": answers[s]}] for s in SIDES},
                "last": turn, "voted": None}
        yield frame(stats_markdown(chat, stats["left"]), stats_markdown(chat, stats["right"]), done)

    def make_vote(choice: str):
        def vote(state):
            if state["last"] is None:
                return "Nothing to vote on yet: send a message and wait for both answers.", state
            if state["voted"]:
                return f"This turn already has a vote ({VOTES[state['voted']]}); send another message.", state
            try:
                row = vote_row(choice, state["last"])
            except ValueError as e:
                return f"Not recorded: {e}.", state
            log.append(row)
            counts = log.count()
            tally = ", ".join(f"{VOTES[k]} {n}" for k, n in counts.items())
            trainable = counts["left"] + counts["right"]
            return (f"Recorded **{VOTES[choice]}** in `{log.path}` ({tally}; {trainable} trainable pairs: "
                    f"`qsimpo train CONFIG --data.path {log.path}`)."), {**state, "voted": choice}
        vote.__name__ = f"vote_{choice}"
        return vote

    def clear():
        return "", [], [], "", "", _new_state(), ""

    with gr.Blocks(title="qsimpo demo", analytics_enabled=False) as demo:
        gr.Markdown(f"## qsimpo demo: {chat.sides['left'].name} vs {chat.sides['right'].name}\n"
                    f"{chat.description}. Left: **{chat.sides['left'].label}**. Right: **{chat.sides['right'].label}**. "
                    "One message goes to both; each side keeps its own history.")
        state = gr.State(_new_state())
        with gr.Row(equal_height=True):
            bots, stats = {}, {}
            for side in SIDES:
                with gr.Column():
                    bots[side] = gr.Chatbot(label=chat.sides[side].label, height=300, elem_id=f"chat-{side}",
                                            feedback_options=None, buttons=[], placeholder=f"{chat.sides[side].name} answers here")
                    stats[side] = gr.Markdown(elem_id=f"stats-{side}", elem_classes=["stats"])
        with gr.Row():
            message = gr.Textbox(placeholder="Message both models and press Enter", show_label=False, scale=5,
                                 elem_id="message", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            clear_btn = gr.Button("Clear", scale=1, elem_id="clear")
        with gr.Row():
            buttons = {choice: gr.Button(label, size="md", elem_id=f"vote-{choice.replace('_', '-')}")
                       for choice, label in VOTES.items()}
        status = gr.Markdown(elem_id="vote-status")
        with gr.Accordion("Generation settings (the same for both sides)", open=False, elem_id="settings"):
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature (0: greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="top-p", elem_id="top-p")
                max_new = gr.Slider(1, max_new_limit, value=min(96, max_new_limit), step=1, label="max new tokens", elem_id="max-new-tokens")
                seed = gr.Number(0, precision=0, label="seed (both sides)", elem_id="seed")
            system = gr.Textbox(chat.system_prompt or "", label="system prompt", lines=2, visible=chat.takes_system,
                                placeholder="prepended to both conversations as a system message", elem_id="system-prompt")

        inputs = [message, system, temperature, top_p, max_new, seed, state]
        outputs = [message, bots["left"], bots["right"], stats["left"], stats["right"], state, status]
        # Several users' messages run at once: the batcher generates whatever is waiting together, up to
        # its batch size; more wait in gradio's queue, which tells each user their place.
        users = max(1, chat.batcher.max_rows // len(SIDES))
        send.click(respond, inputs, outputs, api_name="send", concurrency_id="model", concurrency_limit=users)
        message.submit(respond, inputs, outputs, api_name="send_enter", api_visibility="undocumented",
                       concurrency_id="model", concurrency_limit=users)
        for choice, button in buttons.items():
            button.click(make_vote(choice), [state], [status, state], api_name=f"vote_{choice}")
        clear_btn.click(clear, None, outputs, api_name="clear")
        for bot in bots.values():  # a column's own trash icon clears both: the two histories stay one conversation
            bot.clear(clear, None, outputs, api_visibility="undocumented")
    demo.votes_path = log.path
    return demo


def launch_demo(adapter: str | None = None, base: str | None = None, compare_adapter: str | None = None,
                votes: str | None = None, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
                trust_remote_code: bool = False, block: bool = True):
    """Load the model once, build the UI and serve it; returns the Blocks (after the server stops, if ``block``)."""
    adapter, base = resolve_adapter(adapter, base)
    chat = SideBySide.load(adapter, base, compare_adapter, trust_remote_code=trust_remote_code)
    demo = build_app(chat, votes or default_votes_path(adapter))
    print(f"votes are appended to {demo.votes_path}")
    try:
        # quiet: gradio's own hint for a public link is `share=True` in code; a qsimpo user passes --share
        demo.queue().launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                            theme=THEME, css=CSS, footer_links=["api"], ssr_mode=False, show_error=True)
    except OSError as e:
        if port is None or "Cannot find empty port" not in str(e):
            raise
        raise UsageError(f"port {port} on {host} is in use: pass another --port, or leave it out to take the first "
                         "free one from 7860") from None
    print(f"* Running on local URL:  {demo.local_url}")
    if not demo.share_url:  # with --share, gradio prints the public URL itself
        print("* a temporary public link (for others to try it): qsimpo demo --share")
    if block:
        demo.block_thread()
    return demo

