"""Starting processes, in one place: local ranks (`--nproc`), what a launcher (torchrun, accelerate, srun)
tells a rank about its world, and SLURM jobs (render, submit, requeue, status)."""
