"""Scale-out: many stateless replicas of the serving stack behind one endpoint (docs/scaling.md)."""
