"""The pipeline: config schemas, run dirs, stages, the report and the command line. It imports the library (``probe``), never the reverse."""
