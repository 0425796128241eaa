"""clipline's pipeline stages, one subpackage each; ``common`` holds what two or more stages share."""
