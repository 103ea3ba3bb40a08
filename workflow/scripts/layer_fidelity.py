"""Per-tensor cosine and SQNR of one INT8 model against its float model (thin adapter)."""

from n6qat.atomic import atomic_path
from n6qat.layer_fidelity import layer_fidelity
from n6qat.model import load_model
from n6qat.rulelog import rule_logging
from n6qat.train import configure_runtime
from n6qat.validation_npz import load_validation_npz

with rule_logging(snakemake.log[0]) as log:
    configure_runtime(snakemake.params.threads)
    inputs, _ = load_validation_npz(snakemake.input.validation)
    table = layer_fidelity(
        load_model(snakemake.input.model),
        snakemake.input.tflite,
        inputs,
        max_samples=snakemake.params.max_samples,
        num_threads=snakemake.params.threads,
    )
    log.info("%s\n%s", snakemake.input.tflite, table.drop(columns="tensor").to_string())
    with atomic_path(snakemake.output.csv) as tmp:
        table.to_csv(tmp, index=False)
