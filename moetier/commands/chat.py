"""``moetier chat [MODEL_DIR]``: interactive chat using the model's chat template."""

from __future__ import annotations

import argparse
import sys

from moetier.commands.run import (
    add_load_arguments,
    add_sampling_arguments,
    check_args,
    load_kwargs,
    loading_notice,
    model_label,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat (uses the checkpoint's chat template)",
                       description="Chat with a model in the terminal: each line you type is a user message, "
                       "rendered with the checkpoint's chat template together with the conversation so far; "
                       "an empty line or Ctrl-D ends the chat.")
    add_load_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import moetier

    check_args(args)
    with loading_notice(model_label(args)):
        model = moetier.load(args.model_dir, **load_kwargs(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("moetier chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            print("moetier: that line is not valid UTF-8 text; type it again", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        ids = model.encode_prompt(messages)
        res = model.generate_ids(ids, args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                                 stop=args.stop, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        print(f"\n[{res.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
        messages.append({"role": "assistant", "content": res.text})
    return 0
