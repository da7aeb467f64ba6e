"""Under ``torchrun`` (DDP, FSDP2): what every rank of a multi-process job does to save and load a checkpoint.

``distributed``: rank, rank 0's answer for all, the process group, unwrapping DDP/FSDP models;
``collective``: the commit every rank calls; ``sharded``: sharded checkpoints (FSDP2 + DCP), their
commit and loads; ``dcp_storage``: where DCP writes and reads their bytes; ``dcp_index``: DCP's
index as JSON (``dcp.json``). In one process all of it reduces to the plain single-rank path.
"""
