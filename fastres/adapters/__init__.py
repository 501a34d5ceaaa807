"""Adapters: one library's residual blocks as the canonical description plans work on
(:class:`fastres.plans.description.ResidualBlock`), one file per library."""
