"""The trust boundary of the tools: massl-export, massl-eval and massl-report read a checkpoint's
manifest.json and teacher/teacher.safetensors only (data, never code); the pickled files of an
older checkpoint are read only when the user says the checkpoint is trusted."""

TRUST_HELP = ("read a checkpoint without teacher/teacher.safetensors (older massl) through its pickled files, "
              "which can run code: only for checkpoints from a source you trust")
