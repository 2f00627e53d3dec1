"""Training, a module per step: driver (the job) → ingest (decoding, Ray Data) → worker (each Ray Train
worker) → stages (what a variant trains) → loop (step and epoch) → finishing (the artifact); checkpoint
and runs are what a run keeps on storage, args the command line, adapt the site fine-tuning."""
