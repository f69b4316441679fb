"""The course machinery, kept apart from the LLM code it teaches.

    tinylm.course.exercises      checks for the chapters' exercises (`check(...)`, hints)
    tinylm.course.classroom      student edition and grading (`python -m tinylm.classroom`)
    tinylm.course.grading        verdicts computed outside the student's kernel (a worker runs
                                 the answers, the checks compare in the grader)
    tinylm.course.wire           the safe channel for the worker's outputs (JSON + arrays, no pickle)
    tinylm.course.widgets        ipywidgets panels that also render once headless
    tinylm.course.plots          the workbook's plot style, number formatting, LivePlot
    tinylm.course.run_notebooks  execute the chapters headless (`python -m tinylm.run_notebooks`)

The old names (`tinylm.exercises`, `tinylm.classroom`, ...) stay importable (tinylm._moved).
"""
