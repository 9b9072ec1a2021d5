"""FastAPI routers, one per concern: predict, fhir, cds_hooks, health, ui."""
