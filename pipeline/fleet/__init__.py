"""`forge fleet`: the pipeline's stages as Ray tasks (dag -> resources -> task per worker -> driver).

Ray is the optional extra `[fleet]`; nothing here imports it at module level, so `forge` works
without it and `forge fleet` says how to install it.
"""
