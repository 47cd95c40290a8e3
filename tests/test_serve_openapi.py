"""penwright serve's OpenAPI document against the real server: what it says each route takes and returns,
then schemathesis (a schema-driven fuzzer) on every route, a bounded number of cases: no 5xx, no answer
outside the document, invalid input refused with a 4xx, and a normal request answered after it."""

from __future__ import annotations

import shutil
import subprocess

import httpx

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
]
# positive_data_acceptance is left out: a request the schema allows may still be refused, with a 400 naming the
# field, for what a schema cannot say (a prompt plus max_tokens beyond the context, prompts x n over the limit)


def test_the_document_describes_each_route(serve_tiny):
    doc = httpx.get(f"{serve_tiny().url}/openapi.json").json()
    paths = doc["paths"]
    completions = paths["/v1/completions"]["post"]
    assert set(completions["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert completions["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionBody")
    prompt = doc["components"]["schemas"]["CompletionBody"]["properties"]["prompt"]
    assert {"type": "array", "items": {"type": "integer"}} in prompt["anyOf"]  # token ids are documented
    assert set(paths["/"]["get"]["responses"]["200"]["content"]) == {"text/html", "application/json"}
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert {p["name"] for p in paths["/generate"]["get"]["parameters"]} >= {"length", "prefix", "temperature"}
    for path in paths.values():
        for op in path.values():
            assert "422" not in op["responses"]  # validation errors are 400s here
            assert "400" in op["responses"] or op.get("requestBody") is None
    for name in ("Completion", "ErrorBody", "Tokenized", "Health", "Logprobs"):
        assert name in doc["components"]["schemas"]
    r = httpx.request("PUT", f"{serve_tiny().url}/")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"


# a chat template, so /v1/chat/completions answers the requests its schema allows (without one it is a 400)
CHAT_TEMPLATE = (
    "serve.chat_template='{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}'"
)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(serve_tiny, tmp_path):
    server = serve_tiny(CHAT_TEMPLATE)
    normal = {"prompt": "The quick", "max_tokens": 8, "temperature": 0}
    expected = httpx.post(f"{server.url}/v1/completions", json=normal).json()["choices"][0]["text"]
    cmd = [
        shutil.which("st") or "st",
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        "15",
        "--seed",
        "7",
        "--no-shrink",
        "--phases",
        "coverage,fuzzing",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-6000:]
    assert proc.returncode == 0, tail
    assert "No issues found" in tail and "Tested: 12" in tail, tail
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert httpx.post(f"{server.url}/v1/completions", json=normal).json()["choices"][0]["text"] == expected
