"""`python -m dafast.chat MODEL [--prompt TEXT]`: talk to one variant with its chat template.

MODEL is a model directory (a variant the matrix wrote, or any local HF model) or the default
model's name. Without --prompt it is an interactive loop: each line is a user turn, the
conversation is kept (`/reset` forgets it, `/quit` or end of input ends). With --prompt it
answers once and exits (scripts, tests). Sampling defaults to the paper's for conversations
(dafast.generation.CHAT_SAMPLING); --greedy answers deterministically.
"""

from __future__ import annotations

import argparse
import sys

from dafast.generation import CHAT_SAMPLING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dafast.chat",
                                     description="Talk to a model with its chat template.")
    parser.add_argument("model", help="a local model directory or the default model's name")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="a system message to start the conversation with")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=CHAT_SAMPLING["temperature"])
    parser.add_argument("--top-k", type=int, default=CHAT_SAMPLING["top_k"])
    parser.add_argument("--top-p", type=float, default=CHAT_SAMPLING["top_p"])
    parser.add_argument("--repetition-penalty", type=float,
                        default=CHAT_SAMPLING["repetition_penalty"])
    parser.add_argument("--greedy", action="store_true", help="no sampling (temperature 0)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")

    from dafast.generation import ChatModel
    from dafast.models import resolve_model

    try:
        model = ChatModel(resolve_model(args.model))
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampling = dict(max_tokens=args.max_tokens, top_k=args.top_k, top_p=args.top_p,
                    temperature=0.0 if args.greedy else args.temperature,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)
    start = [{"role": "system", "content": args.system}] if args.system else []

    if args.prompt is not None:
        out = model.generate(start + [{"role": "user", "content": args.prompt}], **sampling)
        print(out.text)
        return 0

    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model}; /reset forgets the conversation, /quit ends it")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            continue
        if line.strip() == "/quit":
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line})
        out = model.generate(messages, **sampling)
        messages.append({"role": "assistant", "content": out.text})
        print(f"model> {out.text}" if interactive else out.text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
