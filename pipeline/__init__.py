"""The offline data side, the ground floor every other package stands on: mesh discovery and
the shapes table, the procedural demo meshes, mesh loading, rendering and surface sampling,
teacher backends and prompts, downstream dataset conversion, and the zarr store layer with the
cache layout. May import: nothing of ``recon``, ``stages`` or ``cli``."""
