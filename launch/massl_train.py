"""massl-train as a script file, for launchers that start a script path and cannot run a module
(DeepSpeed's Slurm runner runs `python -u SCRIPT args`); launch/deepspeed.sh picks it for them."""
from massl.cli import train_main

if __name__ == "__main__":
    train_main()
