"""Models and teachers: timm creation and kdpipe's registered models, teacher sources, run
directories, a teacher loaded once, and stage one's teacher pass over the views."""
