"""Running a cluster on an existing engine: each module starts the same roles (`pserver scheduler`,
`pserver server`, the worker program) the way its engine starts things, with the PSERVER_* settings.

  ray.py      scheduler and servers as Ray actors in a placement group, workers as Ray actors
  slurm.py    the roles as `srun` steps inside an allocation (contiguous ranks per role)
  keyfiles.py one role's share of the CURVE keys, carried as bytes and written back privately

Kubernetes is rendered, not driven: pserver/k8s.py. docs/engines.md has usage and measurements.
"""
