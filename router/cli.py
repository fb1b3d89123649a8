"""The ``pdserve`` command: ``generate`` (offline), ``serve`` (the cluster), ``bench`` (load).

Subcommands import their heavy dependencies lazily, so ``pdserve --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from engine.arg_utils import add_engine_arguments, engine_config_from_args


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate text offline with the engine (no server)"
    )
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sampling-seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="apply the chat template")
    add_engine_arguments(parser)
    parser.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from engine.tiny import TINY_MODEL_LABEL, TINY_MODEL_NAME

    config = engine_config_from_args(args)
    llm = LLM.from_config(config)
    prompts: list = list(args.prompt)
    if args.chat:
        prompts = [
            {
                "prompt_token_ids": llm.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                ),
                "prompt": p,
            }
            for p in prompts
        ]
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
        max_tokens=args.max_tokens,
    )
    if config.model.model == TINY_MODEL_NAME:
        print(f"model: {TINY_MODEL_LABEL}")
    for output in llm.generate(prompts, params):
        completion = output.outputs[0]
        print(f"prompt: {output.prompt!r}")
        print(f"output: {completion.text!r}")
        print(f"  ({len(completion.token_ids)} tokens, finish_reason={completion.finish_reason})")
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    from router.serve import add_serve_arguments

    parser = subparsers.add_parser(
        "serve", help="start the cluster (Ray workers + router) and serve the OpenAI API"
    )
    add_serve_arguments(parser)
    add_engine_arguments(parser)
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from router.serve import run_serve

    return run_serve(args, engine_config_from_args(args))


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from benchmarks.serving.cli import add_bench_arguments

    parser = subparsers.add_parser(
        "bench", help="load-test an OpenAI-compatible endpoint (pdserve, vLLM, ...)"
    )
    add_bench_arguments(parser)
    parser.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from benchmarks.serving.cli import main_bench

    return main_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="Disaggregated prefill/decode LLM serving."
    )
    parser.add_argument("--log-level", default="WARNING")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_serve(subparsers)
    _add_bench(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as error:
        print(f"pdserve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
