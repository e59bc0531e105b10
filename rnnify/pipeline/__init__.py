"""Running a recipe end to end: the student it builds, the memory plan of its stages, training them in order,
evaluating and saving the result. The top of the library: it may use every package below it."""
