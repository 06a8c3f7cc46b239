"""Export a moe_jax MoE checkpoint to a Hugging Face format.

  python -m experiments.export_hf --checkpoint=DIR --out=OUT --format=mixtral|qwen2_moe|qwen3_moe
"""
from absl import app, flags

from experiments import cli
from moe_jax.convert import export_hf

_CKPT = flags.DEFINE_string("checkpoint", None, "moe_jax checkpoint directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist or be empty).",
                           required=True)
_FORMAT = flags.DEFINE_string("format", "mixtral", f"One of {export_hf.FORMATS}.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")


def main(argv):
  del argv
  out = cli.main_guard(export_hf.export, _CKPT.value, _OUT.value, _FORMAT.value, _OVERWRITE.value)
  print(f"exported {_CKPT.value} as {_FORMAT.value} to {out}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
