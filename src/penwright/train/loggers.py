"""The experiment loggers of the train stage: Weights & Biases (online, or offline with no login) or none.

A resumed run continues the same W&B run: its id is kept in ``<train.ckpt_dir>/wandb_run_id``.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from penwright.core import schema
from penwright.core.log import get_logger, global_rank

log = get_logger("train").info


def wandb_mode() -> str:
    """``WANDB_MODE`` if set; online when an API key or login exists; else offline (with a notice)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "offline", "disabled", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if host and netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    log(
        "no W&B login found (WANDB_API_KEY or `wandb login`): logging offline; `wandb sync wandb/offline-run-*` uploads later"
    )
    return "offline"


def run_metadata(cfg: schema.Config) -> dict:
    """What the W&B run config holds beside the resolved config: git commit, data version."""
    meta: dict[str, object] = {"config": cfg.to_dict()}
    try:
        meta["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        meta["git_commit"] = None
    dvc_file = Path("data.dvc")
    meta["data_dvc_md5"] = hashlib.md5(dvc_file.read_bytes()).hexdigest() if dvc_file.is_file() else None
    return meta


def build_loggers(cfg: schema.Config, ckpt_dir: Path, resuming: bool) -> list:
    """``[WandbLogger]`` for ``logger=wandb`` (unless ``WANDB_MODE=disabled``), else ``[]``."""
    if cfg.logger.kind == "none":
        return []
    mode = wandb_mode()
    if mode == "disabled":
        return []
    from lightning.pytorch.loggers import WandbLogger

    id_file = ckpt_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
    if run_id is None and global_rank() == 0:  # only rank 0 has a real W&B run; the others log nothing
        import secrets

        run_id = secrets.token_hex(4)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    save_dir = Path(cfg.logger.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=cfg.logger.project,
        group=cfg.logger.group,
        tags=list(cfg.logger.tags),
        job_type=cfg.logger.job_type,
        name=os.environ.get("DVC_EXP_NAME") or cfg.logger.name,
        save_dir=str(save_dir),
        offline=mode == "offline",
        id=run_id,
        resume="allow",
        log_model=False,
    )
    logger.log_hyperparams(run_metadata(cfg))  # rank 0 only
    return [logger]
