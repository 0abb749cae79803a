from analysis_operator.cli import main

main()
