"""What workers run: job types, their schemas and the RQ job, queue and worker classes."""

from jobs.settings import apply_process_environment

# Before anything imports numpy, torch or FAISS: thread counts and offline model loading.
apply_process_environment()
