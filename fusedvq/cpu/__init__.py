"""The blocked CPU implementations, with hand-written gradients: stats.py (norm "none" / "stats") and batch.py
(norm "batch"). Small batches take reference.py's composition instead (the routing point decides)."""
