"""Main job placeholder: replaced as the pipeline lands."""
print("main job: nothing to run yet")
