"""A stand-in `vllm` executable for the serve tests (vLLM needs a GPU): `install(folder)` writes it as
folder/bin/vllm. Started as `vllm serve MODEL --host H --port P [--served-model-name NAME]
[--enable-lora --lora-modules ITEM...]`, it

- parses each `--lora-modules` item by vLLM's rule (`parse_lora_module`) and fails to start on one it
  cannot parse, as vLLM does;
- lists its models as vLLM does: the served name (or MODEL), then each LoRA module's name;
- requires `Authorization: Bearer $VLLM_API_KEY` on every route (no key set: every request is refused);
- answers a completion for a model it lists with " fake answer", 404 for any other model;
- appends JSON rows to $FAKE_VLLM_LOG: one at start {pid, key, argv, modules}, one per request
  {path, authorization, model (completions only)}."""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def parse_lora_module(item: str) -> tuple[str, str]:
    """(name, path) of one `--lora-modules` item, by the rule of vLLM's LoRAParserAction
    (vllm/entrypoints/openai/cli_args.py): an item with '=' and no ',' is split on every '=' into
    exactly name and path (anything else fails), every other item is a JSON LoRAModulePath."""
    if "=" in item and "," not in item:
        name, path = item.split("=")
        return name, path
    module = json.loads(item)
    assert set(module) <= {"name", "path", "base_model_name"}, module  # LoRAModulePath's fields
    return module["name"], module["path"]


def install(folder: Path) -> tuple[Path, Path]:
    """(the bin folder holding an executable `vllm` that runs this file, the log it appends to)."""
    bin_dir = Path(folder) / "bin"
    bin_dir.mkdir()
    script = bin_dir / "vllm"
    script.write_text(f"#!{sys.executable}\n{Path(__file__).read_text(encoding='utf-8')}", encoding="utf-8")
    script.chmod(0o755)
    return bin_dir, Path(folder) / "fake-vllm.jsonl"


def _option(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _lora_modules(args: list[str]) -> list[tuple[str, str]]:
    if "--lora-modules" not in args:
        return []
    items = args[args.index("--lora-modules") + 1:]
    return [parse_lora_module(item) for item in items[: next((i for i, a in enumerate(items) if a.startswith("--")),
                                                              len(items))]]


def serve(args: list[str]) -> None:
    modules = _lora_modules(args)
    names = [_option(args, "--served-model-name") or args[1]] + [name for name, _ in modules]
    key, log = os.environ.get("VLLM_API_KEY", ""), os.environ["FAKE_VLLM_LOG"]

    def record(**row):
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def authorized(self, **row) -> bool:  # as vLLM with --api-key / VLLM_API_KEY: /v1 needs the key
            got = self.headers.get("Authorization")
            record(path=self.path, authorization=got, **row)
            if not key or got != "Bearer " + key:
                self.send(401, {"error": "unauthorized"})
                return False
            return True

        def do_GET(self):
            if self.authorized():
                self.send(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self.authorized(model=body.get("model")):
                return
            if body.get("model") not in names:
                return self.send(404, {"error": {"message": "model not found"}})
            self.send(200, {"choices": [{"text": " fake answer", "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 3, "completion_tokens": 2}})

    record(pid=os.getpid(), key=key, argv=args, modules=modules)
    ThreadingHTTPServer((_option(args, "--host"), int(_option(args, "--port"))), Handler).serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1:])
