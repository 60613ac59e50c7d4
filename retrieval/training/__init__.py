"""Training the embedding: the recipe, the losses, the select / refit stages, validation and
the whale protocol. Nothing on the answering side imports this package."""
