"""Names of the files and folders inside stage outputs: the contract between a stage and the
stages that read its output, kept in one place. Paths of the outputs themselves live in dvc.yaml."""

CHECKPOINT_DIR = "checkpoint"  # download: BF16 HF checkpoint; calibrate/build: ModelOpt unified checkpoint
QUANT_STATE_FILE = "quant_state.pt"  # calibrate: ModelOpt state + calibrated quantizer buffers
CALIBRATION_TENSORS_FILE = "calibration.safetensors"  # calibration-set: [N, L] token ids
OPTIONS_FILE = "llm_api_options.yaml"  # build: TensorRT-LLM LLM-API options
GATE_REPORT_FILE = "gate_report.json"  # evaluate: GateReport.to_json()
RECEIPT_FILE = "receipt.json"  # publish: what was published or why not
THROUGHPUT_FILE = "throughput.json"  # throughput: predicted (and measured) tok/s, J/token, $/Mtok
REPORT_FILE = "report.md"  # report: the comparison across targets
README_RESULTS_FILE = "readme_results.md"  # report: the README's generated block (pipeline/reporting/readme_results.py)
FIGURES_DIR = "figures"  # report: PNG plots (`dvc plots show`)
TABLES_DIR = "plots"  # report: CSV/JSON tables


MANIFEST_NAME = "manifest.json"
