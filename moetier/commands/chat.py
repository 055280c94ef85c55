"""``moetier chat [MODEL_DIR]``: interactive chat using the model's chat template."""

from __future__ import annotations

import argparse
import sys

from moetier.commands.run import add_load_arguments, add_sampling_arguments, load_kwargs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat (uses the checkpoint's chat template)")
    add_load_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import moetier

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
        messages.append({"role": "user", "content": line})
        ids = model.encode_prompt(messages)
        res = model.generate_ids(ids, args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                                 stop=args.stop, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        print(f"\n[{res.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
        messages.append({"role": "assistant", "content": res.text})
    return 0
