"""Writing ONNX graphs: weights inline below protobuf's 2 GB limit, in a ``<graph>.data`` file beside the graph above
it; and a folder ``Engine.load`` reads (graph, tokenizer, config) straight from a model.
"""

from __future__ import annotations

from pathlib import Path

from penwright.core.files import save_tokenizer

GRAPH = "model.onnx"

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GB: bigger models keep weights beside the graph


def save_graph(model, path: Path, external: bool | None = None) -> bool:
    """Write a graph; its weights go to ``<name>.data`` beside it past protobuf's 2 GB limit (or as ``external``
    says). Returns whether they did."""
    import onnx

    if external is None:
        external = sum(t.ByteSize() for t in model.graph.initializer) >= EXTERNAL_DATA_BYTES
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    return external


def save_with_external_data_if_large(path: Path) -> bool:
    """Re-save ``path`` with its weights in ``model.onnx.data`` when the graph passes protobuf's 2 GB."""
    import onnx

    if path.stat().st_size < EXTERNAL_DATA_BYTES:
        return False
    return save_graph(onnx.load(str(path)), path, external=True)


def node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def save_fused(model, tokenizer, out_dir: Path) -> Path:
    """``model`` as the export stage writes it by default (penwright's fused graph), with its tokenizer and
    config beside it: a folder ``Engine.load`` and ``penwright serve`` read (no parity check: the GPU check and
    the benchmarks use it on random weights)."""
    from penwright.export.graph import build_graph

    out_dir.mkdir(parents=True, exist_ok=True)
    save_graph(build_graph(model, "fused"), out_dir / GRAPH)
    save_tokenizer(tokenizer, out_dir)
    model.config.save_pretrained(out_dir)
    return out_dir
