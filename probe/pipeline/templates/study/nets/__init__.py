"""This study's model code: conf/model/*.yaml name its classes as ``nets.<module>.<Class>`` (probe's commands
import from the study folder)."""
