"""The `flax-sgm` command line: verify, convert, inspect, lower, sample.

Commands only: the work is in pretrained.py and pretrained_unet.py (checkpoints in,
modules or a converted directory out), flax_sgm.verify (torch vs flax) and
lowering.py. torch is imported only by `verify` and by reading torch pickles.
One module per command (*_cmd.py; convert and inspect share one); common.py holds what
they share: exit statuses, one-line errors, JSON, the stack options.
"""

from __future__ import annotations

import click

from flax_sgm.cli.convert_cmd import convert, inspect
from flax_sgm.cli.lower_cmd import lower
from flax_sgm.cli.sample_cmd import sample
from flax_sgm.cli.verify_cmd import verify


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  flax-sgm verify                      # parity report of the embedded default
  flax-sgm inspect sd_xl_base_1.0.safetensors
  flax-sgm convert sd_xl_base_1.0.safetensors --prefix model.diffusion_model.input_blocks.4.1 \\
      --head-dim 64 -o input_blocks.4.1
  flax-sgm convert v1-5-pruned.ckpt --all --heads 8 -o sd15-attention
  flax-sgm convert stable-diffusion-xl-base-1.0/unet --all -o sdxl-attention
  flax-sgm convert sd_xl_base_1.0.safetensors --unet -o sdxl-unet   # the whole UNet
  flax-sgm lower --config sdxl-unet --backward
  flax-sgm sample stable-diffusion-xl-base-1.0 --prompt "a lighthouse" -o lighthouse.png

Exit status: 0 ok, 1 parity failed (verify) or no lowering (lower), 2 bad input, 3 an unexpected error.""",
)
@click.version_option(package_name="flax-sgm")
@click.option("--debug", is_flag=True, help="Show the full traceback on an error.")
def cli(debug):
    """Stable Diffusion's sgm in Flax NNX (UNet, autoencoder, text encoders, samplers, LoRA): sample images, check
    parity with torch, convert and inspect checkpoints."""


for command in (verify, convert, inspect, lower, sample):
    cli.add_command(command)


def main(argv=None):
    cli.main(args=argv, prog_name="flax-sgm")
