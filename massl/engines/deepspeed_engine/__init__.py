"""`deepspeed`: student and teacher under DeepSpeed ZeRO stage 1, 2 or 3 (engine.zero_stage).

    ds_config.py   the DeepSpeed config massl builds, and the checks of a user's own file
    partitions.py  the ZeRO partitions massl reads and writes: gradient fragments (clipping),
                   fp32 master fragments and the teacher laid out like them (EMA)
    engine.py      the Engine: initialisation, forward, backward, clipped step, teacher EMA
    checkpoint.py  the engine's checkpoint part (format `deepspeed`) and its teacher reader

Only engine.py imports DeepSpeed; the tools read a checkpoint's teacher without it.
"""
