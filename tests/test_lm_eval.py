"""EleutherAI's lm-evaluation-harness, unchanged, against ``penwright serve``: its ``local-completions``
model on two offline tasks written here (one multiple-choice, one generate_until), with the exported
folder's tokenizer (``tokenizer_backend=huggingface``) and with the server's (``remote``). Its accuracy
must equal the accuracy computed directly with transformers on the same items, item by item."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers.net import free_port
from helpers.paths import ENGLISH, REPO
from helpers.reweighted import export_reweighted

pytestmark = pytest.mark.slow

WORDS = ENGLISH.split()
UNTIL = "\n"
GEN_TOKENS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_gpt2):
    """The tiny GPT-2 with larger random weights (its greedy choices vary, so accuracy is neither 0 nor 1),
    exported by the export stage."""
    return export_reweighted(tiny_gpt2, tmp_path_factory.mktemp("lm-eval-model"), seed=1)


def transformers_reference(hf):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(hf)
    net = GPT2LMHeadModel.from_pretrained(hf).eval()

    def loglikelihood(context: str, continuation: str) -> float:  # as lm-eval tokenizes: apart, then joined
        ctx, cont = tok.encode(context), tok.encode(continuation)
        with torch.no_grad():
            logprobs = torch.log_softmax(net(torch.tensor([ctx + cont])).logits[0].double(), -1)
        return float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))

    def greedy(prompt: str) -> str:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = net.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=GEN_TOKENS,
                pad_token_id=tok.eos_token_id,
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split(UNTIL)[0]

    return loglikelihood, greedy


def write_tasks(root, loglikelihood, greedy) -> tuple[dict, dict]:
    """Two jsonl files and their task YAMLs; the accuracy transformers gives on each task, item by item."""
    mc, gen = [], []
    for i in range(16):
        start = (i * 7) % (len(WORDS) - 12)
        mc.append(
            {
                "question": " ".join(WORDS[start : start + 4]),
                "choices": [" ".join(WORDS[start + 4 + j : start + 6 + j]) for j in range(4)],
                "answer": i % 4,
            }
        )
    for i in range(10):
        prompt = " ".join(WORDS[i * 3 : i * 3 + 3])
        gen.append({"prompt": prompt, "target": greedy(prompt) if i % 2 == 0 else "no such text"})
    expected_mc = []
    for doc in mc:
        scores = [loglikelihood(doc["question"], " " + c) for c in doc["choices"]]
        expected_mc.append(int(np.argmax(scores)) == doc["answer"])
    expected_gen = [greedy(doc["prompt"]) == doc["target"] for doc in gen]
    for name, docs in (("mc", mc), ("gen", gen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "penwright_mc.yaml").write_text(
        "task: penwright_mc\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (root / "penwright_gen.yaml").write_text(
        "task: penwright_gen\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\ntarget_delimiter: ""\n'
        f"generation_kwargs:\n  until: [{json.dumps(UNTIL)}]\n  max_gen_toks: {GEN_TOKENS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return {"mc": expected_mc, "gen": expected_gen}, {"mc": mc, "gen": gen}


def run_lm_eval(url, onnx, tasks, out, backend, names, chat: bool = False) -> dict:
    args = [
        f"model=penwright,base_url={url}/v1/completions,tokenizer_backend={backend},max_length=64,num_concurrent=2",
    ]
    if backend == "huggingface":
        args[0] += f",tokenizer={onnx}"
    if chat:  # the chat route, the prompt sent as messages (lm-eval's --apply_chat_template)
        args = [f"model=penwright,base_url={url}/v1/chat/completions,tokenizer_backend=none,num_concurrent=2"]
    cmd = [
        shutil.which("lm_eval") or "lm_eval",
        "run",
        "--model",
        "local-chat-completions" if chat else "local-completions",
        *(["--apply_chat_template"] if chat else []),
        "--model_args",
        args[0],
        "--tasks",
        ",".join(names),
        "--include_path",
        str(tasks),
        "--output_path",
        str(out),
        "--log_samples",
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {}
    for name in names:
        lines = next(out.rglob(f"samples_{name}_*.jsonl")).read_text().splitlines()
        samples[name] = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
    return {"results": results["results"], "samples": samples}


def serving(onnx, tmp_path):
    """``penwright serve`` on ``onnx`` in its own process, as a user starts it; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "penwright.cli", "serve", f"serve.model_dir={onnx}", f"serve.port={port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "PENWRIGHT_API_KEY": ""},
    )
    try:
        from benchmarks.common import wait_until_healthy

        wait_until_healthy(url, 60, server)
        yield url
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_lm_eval_harness_accuracy_equals_transformers_on_the_same_items(model, tmp_path):
    hf, onnx = model
    loglikelihood, greedy = transformers_reference(hf)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    expected, docs = write_tasks(tasks, loglikelihood, greedy)
    assert 0 < np.mean(expected["mc"]) < 1, "the items do not tell a right model from a wrong one"
    assert np.mean(expected["gen"]) == 0.5

    for url in serving(onnx, tmp_path):
        hf_run = run_lm_eval(url, onnx, tasks, tmp_path / "out-hf", "huggingface", ["penwright_mc", "penwright_gen"])
        remote = run_lm_eval(url, onnx, tasks, tmp_path / "out-remote", "remote", ["penwright_mc"])

    for run in (hf_run, remote):
        mc = run["samples"]["penwright_mc"]
        assert [bool(s["acc"]) for s in mc] == expected["mc"]
        assert run["results"]["penwright_mc"]["acc,none"] == pytest.approx(np.mean(expected["mc"]))
        for s, doc in zip(mc, docs["mc"]):  # each choice's loglikelihood, as the server scored it
            want = [loglikelihood(doc["question"], " " + c) for c in doc["choices"]]
            np.testing.assert_allclose([float(r[0][0]) for r in s["resps"]], want, atol=1e-3)  # (logged as text)
    gen = hf_run["samples"]["penwright_gen"]
    assert [bool(s["exact_match"]) for s in gen] == expected["gen"]
    assert [s["filtered_resps"][0] for s in gen] == [greedy(d["prompt"]) for d in docs["gen"]]
    assert hf_run["results"]["penwright_gen"]["exact_match,none"] == pytest.approx(0.5)


def test_lm_eval_local_chat_completions_equals_transformers_replies(tiny_gpt2, tmp_path):
    """lm-eval's ``local-chat-completions`` with ``--apply_chat_template`` on a generate_until task: each prompt goes
    as a user message to /v1/chat/completions; the replies are transformers' greedy replies under the chat template."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from penwright.core.chat_format import ChatFormat

    hf, onnx = export_reweighted(tiny_gpt2, tmp_path / "model", seed=2, chat_template=ChatFormat("Job", "Ann").jinja())
    tok = AutoTokenizer.from_pretrained(hf)
    net = GPT2LMHeadModel.from_pretrained(hf).eval()

    def reply(prompt: str) -> str:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
        )
        with torch.no_grad():
            out = net.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=GEN_TOKENS,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id,
            )
        return tok.decode(out[0, len(ids) :], skip_special_tokens=True).split(UNTIL)[0]

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _, docs = write_tasks(tasks, lambda context, continuation: 0.0, reply)
    expected = [reply(d["prompt"]) for d in docs["gen"]]
    assert len(set(expected)) > 1, "the replies do not depend on the prompt"
    for url in serving(onnx, tmp_path):
        run = run_lm_eval(url, onnx, tasks, tmp_path / "out-chat", "none", ["penwright_gen"], chat=True)
    gen = run["samples"]["penwright_gen"]
    assert [s["filtered_resps"][0] for s in gen] == expected
    assert [bool(s["exact_match"]) for s in gen] == [e == d["target"] for e, d in zip(expected, docs["gen"])]
    assert run["results"]["penwright_gen"]["exact_match,none"] == pytest.approx(0.5)
