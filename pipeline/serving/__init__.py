"""A real engine serving forge's artifacts on this machine: which engine can run a format here
(`engines_here`), starting and stopping it (`server`), checking that what answers is what we
mean to score (`identity`), and the vLLM launcher run from the serving venv (`launch_vllm`)."""
